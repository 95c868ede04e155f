//! What the bench binaries share: child processes that die with the bench, free loopback ports,
//! and `--name N` arguments.
#![allow(dead_code)]

use std::process::Child;

/// A child process killed when dropped, so a bench that panics leaves nothing running.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, then released).
pub fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// Panics on any `--flag` not in `known` (cargo's own `--bench` is always accepted).
pub fn check_flags(known: &[&str]) {
    for a in std::env::args().skip(1) {
        if a.starts_with("--") && a != "--bench" && !known.contains(&a.as_str()) {
            panic!("unknown argument {a}: expected one of {known:?}");
        }
    }
}

/// The number after `name`, or `default`.
pub fn number_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} needs a number")),
        None => default,
    }
}
