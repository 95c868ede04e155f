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

#[tokio::test]
async fn job_submission_refuses_bad_input_and_honours_idempotency_keys() {
    let coordinator = InProcessCoordinator::start().await;
    let admin = coordinator.api.token.clone();
    let admin = Some(admin.as_str());
    let post = reqwest::Method::POST;
    let json = "application/json";
    let good = r#"{"name":"train","kind":"training","image":"registry.local/t:1","resources":{"gpus":2,"cpus":0.5,"memory":"16GiB"}}"#;

    for (body, field) in [
        (r#"{"name":"x","kind":"training""#, "body"),
        ("[1,2,3]", "body"),
        (r#"{"name":7,"kind":"batch","command":["true"]}"#, "name"),
        (
            r#"{"name":"x","kind":"batch","command":["true"],"resources":{"gpus":-1}}"#,
            "resources.gpus",
        ),
        (
            r#"{"name":"x","kind":"batch","command":["true"],"resources":{"gpus":100000}}"#,
            "resources.gpus",
        ),
        (
            r#"{"name":"x","kind":"batch","command":["true"],"resources":{"cpus":-0.5}}"#,
            "resources.cpus",
        ),
        (
            r#"{"name":"x","kind":"batch","command":["true"],"resources":{"memory":"9000PiB"}}"#,
            "resources.memory",
        ),
        (
            r#"{"name":"x","kind":"batch","command":["true"],"colour":"blue"}"#,
            "colour",
        ),
        (r#"{"name":"x","kind":"rocket","command":["true"]}"#, "kind"),
        (r#"{"name":"x","kind":"batch"}"#, ""),
    ] {
        let (status, response) = call(
            &coordinator,
            post.clone(),
            "/v1/jobs",
            admin,
            Some((json, body.as_bytes().to_vec())),
        )
        .await;
        assert_eq!(status, 400, "{body}: {response}");
        assert_eq!(
            response["error"]["code"], "invalid_request",
            "{body}: {response}"
        );
        if !field.is_empty() {
            assert_eq!(response["error"]["field"], field, "{body}: {response}");
        }
        assert!(!response["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty());
    }
    let huge = format!(
        r#"{{"name":"x","kind":"batch","command":["{}"]}}"#,
        "a".repeat(10 * 1024 * 1024)
    );
    let (status, _) = call(
        &coordinator,
        post.clone(),
        "/v1/jobs",
        admin,
        Some((json, huge.into_bytes())),
    )
    .await;
    assert_eq!(status, 413);
    for token in [None, Some("wrong")] {
        let (status, _) = call(
            &coordinator,
            post.clone(),
            "/v1/jobs",
            token,
            Some((json, good.as_bytes().to_vec())),
        )
        .await;
        assert_eq!(status, 401);
    }

    // Idempotency: the same key and spec give the same job; another spec under it is a conflict.
    let submit = |key: &'static str, body: &'static str| {
        let url = format!("http://{}/v1/jobs", coordinator.http_addr);
        let token = coordinator.api.token.clone();
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = submit("key-1", good).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = submit("key-1", good).await;
    assert_eq!(
        (status, &again["id"], &again["created"]),
        (200, &first["id"], &Value::Bool(false))
    );
    let other = r#"{"name":"other","kind":"batch","command":["true"]}"#;
    let (status, conflict) = submit("key-1", other).await;
    assert_eq!(status, 409, "{conflict}");

    let id = first["id"].as_str().unwrap();
    let (status, job) = call(
        &coordinator,
        reqwest::Method::GET,
        &format!("/v1/jobs/{id}"),
        admin,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            job["state"].as_str(),
            job["kind"].as_str(),
            job["spec"]["resources"]["memory"].as_str()
        ),
        (Some("pending"), Some("training"), Some("16GiB"))
    );
    assert_eq!(job["spec"]["resources"]["cpus"], 0.5);
    let (status, _) = call(
        &coordinator,
        reqwest::Method::DELETE,
        &format!("/v1/jobs/{id}"),
        admin,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, response) = call(
        &coordinator,
        reqwest::Method::DELETE,
        &format!("/v1/jobs/{id}"),
        admin,
        None,
    )
    .await;
    assert_eq!(status, 409, "cancelling twice: {response}");
    let (status, _) = call(
        &coordinator,
        reqwest::Method::DELETE,
        "/v1/jobs/j-nothing",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &coordinator,
        reqwest::Method::GET,
        "/v1/jobs/j-nothing",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, jobs) = call(
        &coordinator,
        reqwest::Method::GET,
        "/v1/jobs?stale=true",
        admin,
        None,
    )
    .await;
    assert_eq!((status, jobs.as_array().unwrap().len()), (200, 1));
    let (status, document) = call(
        &coordinator,
        reqwest::Method::GET,
        "/v1/openapi.json",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(document["paths"]["/v1/jobs"]["post"].is_object());
    let (status, cluster) = call(
        &coordinator,
        reqwest::Method::GET,
        "/v1/cluster",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        cluster["leader"], cluster["node"],
        "a single node leads itself: {cluster}"
    );
    coordinator.stop().await;
}
