//! The HTTP API denies by default and answers bad input with 4xx naming the field, never 5xx.

mod common;

use common::*;
use serde_json::Value;

async fn call(
    coordinator: &InProcessCoordinator,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, Value) {
    let mut request =
        reqwest::Client::new().request(method, format!("http://{}{path}", coordinator.http_addr));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some((content_type, bytes)) = body {
        request = request.header("content-type", content_type).body(bytes);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_api_refuses_what_it_should_and_explains() {
    let coordinator = InProcessCoordinator::start().await;
    let admin = coordinator.api.token.clone();
    let admin = Some(admin.as_str());
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    assert_eq!(
        call(&coordinator, get.clone(), "/healthz", None, None)
            .await
            .0,
        200
    );
    for path in ["/v1/agents", "/v1/nodes"] {
        let (status, body) = call(&coordinator, get.clone(), path, None, None).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(
            call(&coordinator, get.clone(), path, Some("wrong"), None)
                .await
                .0,
            401,
            "{path}"
        );
        assert_eq!(
            call(&coordinator, get.clone(), path, admin, None).await.0,
            200,
            "{path}"
        );
    }
    let (status, _) = call(
        &coordinator,
        post.clone(),
        "/v1/tokens",
        None,
        Some(("application/json", br#"{"role":"agent"}"#.to_vec())),
    )
    .await;
    assert_eq!(status, 401, "minting tokens needs the admin token");

    let json = "application/json";
    for (body, status, field, needle) in [
        (r#"{"role":"admin"}"#, 400, Some("role"), "unknown role"),
        (
            r#"{"role":"agent","ttl_seconds":0}"#,
            400,
            Some("ttl_seconds"),
            "between 1 and",
        ),
        (
            r#"{"role":"agent","ttl_seconds":99999999999}"#,
            400,
            Some("ttl_seconds"),
            "between 1 and",
        ),
        (
            r#"{"role":"agent","ttl_seconds":-5}"#,
            422,
            None,
            "ttl_seconds",
        ),
        (
            r#"{"role":"agent","extra":1}"#,
            422,
            None,
            "unknown field `extra`",
        ),
        (r#"{"role":7}"#, 422, None, "role"),
        (r#"{"role":"agent""#, 400, None, "EOF"),
    ] {
        let (got, response) = call(
            &coordinator,
            post.clone(),
            "/v1/tokens",
            admin,
            Some((json, body.as_bytes().to_vec())),
        )
        .await;
        assert_eq!(got, status, "{body}: {response}");
        let message = response["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {response}");
        if let Some(field) = field {
            assert_eq!(response["error"]["field"], field, "{body}: {response}");
        }
    }
    let huge = vec![b' '; 10 * 1024 * 1024];
    let (status, _) = call(
        &coordinator,
        post.clone(),
        "/v1/tokens",
        admin,
        Some((json, huge)),
    )
    .await;
    assert_eq!(status, 413);
    let (status, response) = call(&coordinator, get.clone(), "/v1/nothing", admin, None).await;
    assert_eq!(status, 404, "{response}");
    let (status, response) = call(
        &coordinator,
        post,
        "/v1/tokens",
        admin,
        Some((json, br#"{"role":"agent","ttl_seconds":60}"#.to_vec())),
    )
    .await;
    assert_eq!(status, 201, "{response}");
    assert!(response["token"].as_str().unwrap().starts_with("gantry1."));
    coordinator.stop().await;
}
