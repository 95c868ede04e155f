//! Framed messages over QUIC streams, endpoint construction and the version handshake.

use crate::frame::{self, FrameError, FRAME_BYTES_MAX};
use crate::pki::{parse_certificate, CertIdentity};
use crate::version::{negotiate, Hello, HelloReply, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use serde::{de::DeserializeOwned, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// An agent's session with a coordinator (mutual TLS, agent certificate).
pub const ALPN_AGENT: &[u8] = b"gantry-agent";
/// A node without a certificate yet, exchanging a join token for one.
pub const ALPN_JOIN: &[u8] = b"gantry-join";
/// Coordinator to coordinator (mutual TLS, coordinator certificates on both ends).
pub const ALPN_PEER: &[u8] = b"gantry-peer";

/// A connection that carries nothing for this long is closed. Heartbeats keep sessions alive.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a refusal waits to reach the peer before the connection is closed anyway.
pub const REFUSAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Error codes used when closing a connection.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL_VIOLATION: u32 = 1;
    pub const REFUSED: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("could not connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream ended before the expected message")]
    Closed,
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    config.max_concurrent_uni_streams(64u32.into());
    config.max_concurrent_bidi_streams(16u32.into());
    // Ask the peer to acknowledge after 16 ack-eliciting packets (or its max ACK delay) rather
    // than every other one: Raft's and agents' request-reply traffic then carries its ACKs on
    // the replies instead of packets of their own.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(16u32.into());
    config.ack_frequency_config(Some(ack));
    Arc::new(config)
}

/// Receive buffer asked for on every QUIC socket. Linux's default (208 KiB) overflows when a
/// leader's batch of appends arrives while the receiver is busy, and each drop costs a QUIC
/// loss recovery; the kernel caps the request at `net.core.rmem_max`.
const UDP_RECV_BUFFER_BYTES: usize = 4 << 20;

fn enlarge_recv_buffer(socket: &std::net::UdpSocket) {
    // Best effort: a smaller buffer only means more retransmissions under bursts.
    let _ = socket2::SockRef::from(socket).set_recv_buffer_size(UDP_RECV_BUFFER_BYTES);
}

/// A server endpoint on a socket the caller bound (so tests can bind port 0).
pub fn server_endpoint(
    socket: std::net::UdpSocket,
    tls: rustls::ServerConfig,
) -> Result<quinn::Endpoint, TransportError> {
    enlarge_recv_buffer(&socket);
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok(endpoint)
}

/// A client endpoint bound to an ephemeral port on the family of `remote`.
pub fn client_endpoint(remote: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    let bind: SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    enlarge_recv_buffer(&socket);
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

pub fn quinn_client_config(
    tls: rustls::ClientConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// The ALPN the handshake settled on.
pub fn alpn_of(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The role and identity in the certificate the peer presented, if it presented one.
pub fn peer_identity(connection: &quinn::Connection) -> Option<CertIdentity> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    parse_certificate(chain.first()?.as_ref()).ok()
}

/// Sends whole frames on a QUIC stream.
pub struct FramedSend {
    stream: quinn::SendStream,
}

impl FramedSend {
    pub fn new(stream: quinn::SendStream) -> Self {
        Self { stream }
    }

    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), TransportError> {
        let bytes = frame::encode(message)?;
        self.stream.write_all(&bytes).await?;
        Ok(())
    }

    /// Writes raw bytes; only tests that misbehave on purpose need this.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }

    /// Finishes the stream and waits (at most `timeout`) until the peer has everything, so that a
    /// connection closed right after still delivers the last message, such as a refusal.
    pub async fn finish_and_flush(&mut self, timeout: Duration) {
        let _ = self.stream.finish();
        let _ = tokio::time::timeout(timeout, self.stream.stopped()).await;
    }
}

/// Receives whole frames from a QUIC stream, refusing any over `max_bytes`.
pub struct FramedRecv {
    stream: quinn::RecvStream,
    max_bytes: usize,
}

impl FramedRecv {
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            max_bytes: FRAME_BYTES_MAX,
        }
    }

    /// The next message, or `None` when the peer finished the stream between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, TransportError> {
        let mut prefix = [0u8; 4];
        match self.stream.read_exact(&mut prefix).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let len_bytes = frame::parse_length_prefix(prefix, self.max_bytes)?;
        let mut body = vec![0u8; len_bytes];
        match self.stream.read_exact(&mut body).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Truncated),
            Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        Ok(Some(frame::decode_body(&body)?))
    }

    /// Like [`Self::recv`], but the end of the stream is an error.
    pub async fn expect<T: DeserializeOwned>(&mut self) -> Result<T, TransportError> {
        self.recv().await?.ok_or(TransportError::Closed)
    }
}

/// Opens the first stream of a connection and negotiates the protocol version.
pub async fn client_hello(
    connection: &quinn::Connection,
    software: &str,
) -> Result<(FramedSend, FramedRecv, u16), TransportError> {
    let (send, recv) = connection.open_bi().await?;
    let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
    send.send(&Hello::current(software)).await?;
    match recv.expect::<HelloReply>().await? {
        HelloReply::Accepted { version } => Ok((send, recv, version)),
        HelloReply::Refused { message } => Err(TransportError::Refused(message)),
    }
}

/// Accepts the first stream of a connection and answers its hello. A refusal is sent to the peer
/// and returned as an error.
pub async fn server_hello(
    connection: &quinn::Connection,
) -> Result<(FramedSend, FramedRecv, u16), TransportError> {
    let (send, recv) = connection.accept_bi().await?;
    let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
    let hello: Hello = recv.expect().await?;
    let reply = negotiate(&hello, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION);
    send.send(&reply).await?;
    match reply {
        HelloReply::Accepted { version } => Ok((send, recv, version)),
        HelloReply::Refused { message } => {
            send.finish_and_flush(REFUSAL_FLUSH_TIMEOUT).await;
            Err(TransportError::Refused(message))
        }
    }
}
