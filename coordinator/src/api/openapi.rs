//! The OpenAPI 3.1 document of the HTTP API, served at `/v1/openapi.json`.

use axum::Json;
use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn array_of(name: &str) -> Value {
    json!({ "type": "array", "items": schema(name) })
}

fn stale_parameter() -> Value {
    json!({ "name": "stale", "in": "query", "required": false, "schema": { "type": "boolean" },
            "description": "Answer from this member's state without confirming leadership (may be behind)." })
}

/// The gateway takes any method; documented as the common ones.
fn gateway_path() -> Value {
    let operation = json!({
        "security": [],
        "summary": "The serving gateway: the request goes to /{rest} (query kept) on a healthy replica of the running serving job `name`, round robin; a refused connection moves on to the next replica.",
        "description": "Not behind the bearer token (the admin token is never passed on). Request bodies are read whole, at most 8 MiB; answers stream back as they come, with `x-gantry-allocation` naming the replica. Any coordinator serves it from its own replicated state (at most a commit behind the leader).",
        "parameters": [{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }],
        "responses": { "default": { "description": "The replica's answer." },
            "404": error_response("No running serving job of this name."),
            "413": error_response("Request body over 8 MiB."),
            "502": error_response("The replica failed mid-answer."),
            "503": error_response("No healthy replica, none accepted the connection, or the gateway is at its limits (1,024 requests, 64 MiB of bodies)."),
            "504": error_response("The replica did not start answering within 300 s.") }
    });
    json!({ "get": operation.clone(), "post": operation.clone(), "put": operation.clone(), "delete": operation.clone(),
            "patch": operation.clone(), "head": operation.clone(), "options": operation })
}

pub fn spec() -> Value {
    let unauthorized = error_response("Missing or wrong bearer token.");
    let unavailable = error_response(
        "No leader, or the write did not commit in time: retry (with the same Idempotency-Key).",
    );
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Gantry coordinator API", "version": env!("CARGO_PKG_VERSION") },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object",
                    "required": ["code", "message"],
                    "properties": { "code": { "type": "string" }, "message": { "type": "string" }, "field": { "type": "string" } } } } },
                "JobSpec": { "type": "object", "required": ["name", "kind"], "description": "name, team, kind (training|batch|serving), image, command, env, resources {gpus, gpu_model, cpus, memory}, placement {sites, prefer, max_cost_per_hour}, priority, preemptible, and the section named after the kind.",
                    "properties": { "name": { "type": "string" }, "team": { "type": "string" }, "kind": { "enum": ["training", "batch", "serving"] } } },
                "Job": { "type": "object", "properties": { "id": { "type": "string" }, "name": { "type": "string" }, "team": { "type": "string" },
                    "kind": { "type": "string" }, "state": { "enum": ["pending", "running", "succeeded", "failed", "cancelled"] },
                    "spec": schema("JobSpec"), "submitted_by": { "type": "string" }, "submitted_at_unix_ms": { "type": "integer" },
                    "updated_at_unix_ms": { "type": "integer" }, "idempotency_key": { "type": "string" } } },
                "Submitted": { "type": "object", "properties": { "id": { "type": "string" }, "created": { "type": "boolean" } } },
                "Node": { "type": "object", "properties": { "id": { "type": "string" }, "site": { "type": "string" },
                    "status": { "enum": ["ready", "down"] }, "cpu_cores": { "type": "integer" }, "memory_bytes": { "type": "integer" },
                    "gpus": { "type": "array" }, "runtimes": { "type": "array", "items": { "type": "string" } } } },
                "Agent": { "type": "object", "properties": { "id": { "type": "string" }, "status": { "type": "string" }, "nodes": array_of("Node") } },
                "Cluster": { "type": "object", "properties": { "node": { "type": "integer" }, "leader": { "type": ["integer", "null"] },
                    "term": { "type": "integer" }, "commit_index": { "type": "integer" },
                    "members": { "type": "array", "items": { "type": "object", "properties": { "id": { "type": "integer" },
                        "addr": { "type": "string" }, "http_addr": { "type": "string" }, "role": { "enum": ["voter", "learner"] },
                        "applied_index": { "type": ["integer", "null"] } } } } } },
                "TokenRequest": { "type": "object", "required": ["role"], "properties": { "role": { "enum": ["agent", "coordinator"] }, "ttl_seconds": { "type": "integer", "minimum": 1 } } },
                "Token": { "type": "object", "properties": { "token": { "type": "string" }, "role": { "type": "string" }, "expires_at_unix_s": { "type": "integer" } } },
                "Endpoint": { "type": "object", "properties": { "name": { "type": "string" }, "job": { "type": "string" },
                    "path": { "type": "string", "description": "/serve/{name}/ on any coordinator." },
                    "routed": { "type": "boolean", "description": "False when a newer serving job of the same name takes the path." },
                    "replicas": { "type": "array", "items": { "type": "object", "properties": { "allocation": { "type": "string" },
                        "unit": { "type": "integer" }, "agent": { "type": "string" },
                        "address": { "type": ["string", "null"], "description": "host:port the gateway sends requests to." },
                        "state": { "enum": ["pending", "running", "healthy"] }, "healthy": { "type": "boolean", "description": "Takes traffic." } } } } } }
            }
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/healthz": { "get": { "security": [], "summary": "Liveness of this coordinator process.", "responses": { "200": ok("Alive.", json!({ "type": "object" })) } } },
            "/v1/openapi.json": { "get": { "security": [], "summary": "This document.", "responses": { "200": ok("The document.", json!({ "type": "object" })) } } },
            "/v1/jobs": {
                "post": { "summary": "Submit a job. Answers only once the submission is committed on a quorum.",
                    "parameters": [{ "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string", "maxLength": 128 },
                        "description": "Same key and spec: the same job (200). Same key, other spec: 409." }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": schema("JobSpec") } } },
                    "responses": { "201": ok("Submitted.", schema("Submitted")), "200": ok("Submitted before with this key.", schema("Submitted")),
                        "400": error_response("The spec is invalid; `field` names the field."), "401": unauthorized.clone(),
                        "409": error_response("The Idempotency-Key was used with a different spec."), "413": error_response("Body over 1 MiB."),
                        "503": unavailable.clone() } },
                "get": { "summary": "List jobs.", "parameters": [stale_parameter()],
                    "responses": { "200": ok("Jobs.", array_of("Job")), "401": unauthorized.clone(), "503": unavailable.clone() } }
            },
            "/v1/jobs/{id}": {
                "get": { "summary": "One job.", "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }, stale_parameter()],
                    "responses": { "200": ok("The job.", schema("Job")), "404": error_response("No such job."), "401": unauthorized.clone(), "503": unavailable.clone() } },
                "put": { "summary": "Give a serving job a new spec; its replicas roll over within max_surge and max_unavailable.",
                    "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": schema("JobSpec") } } },
                    "responses": { "200": ok("Updated.", json!({ "type": "object" })), "400": error_response("The spec is invalid."),
                        "404": error_response("No such job."), "409": error_response("Not a running serving job, or the name or team changed."),
                        "401": unauthorized.clone(), "503": unavailable.clone() } },
                "delete": { "summary": "Cancel a job.", "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
                    "responses": { "200": ok("Cancelled.", json!({ "type": "object" })), "404": error_response("No such job."),
                        "409": error_response("The job already ended."), "401": unauthorized.clone(), "503": unavailable.clone() } }
            },
            "/v1/jobs/{id}/explain": { "get": { "summary": "Why the job's waiting units are not placed: nodes removed by each filter, best candidates.",
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }, stale_parameter()],
                "responses": { "200": ok("The explanation.", json!({ "type": "object" })), "404": error_response("No such job."), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/jobs/{id}/artifacts/{name}": { "get": { "summary": "One of the job's artifacts (its bytes), from this member or copied from another.",
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } },
                    { "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }, stale_parameter()],
                "responses": { "200": { "description": "The artifact.", "content": { "application/octet-stream": {} } },
                    "404": error_response("No such job or artifact."), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/artifacts/{sha256}": { "get": { "summary": "An artifact by checksum from this member's store (members copy from one another with it).",
                "parameters": [{ "name": "sha256", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": { "200": { "description": "The bytes.", "content": { "application/octet-stream": {} } },
                    "404": error_response("This member does not hold it."), "401": unauthorized.clone() } } },
            "/v1/policy": {
                "get": { "summary": "The cluster policy checked when jobs are accepted.", "parameters": [stale_parameter()],
                    "responses": { "200": ok("The policy.", json!({ "type": "object", "properties": { "require_digest": { "type": "boolean" } } })), "401": unauthorized.clone(), "503": unavailable.clone() } },
                "put": { "summary": "Replace the cluster policy.",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["require_digest"], "properties": { "require_digest": { "type": "boolean" } } } } } },
                    "responses": { "200": ok("The policy now.", json!({ "type": "object" })), "400": error_response("Bad body."), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/jobs/{id}/logs": { "get": {
                "summary": "A job's output, read from the agents that ran it (kept on their disks, bounded). Streamed (chunked) as raw bytes.",
                "description": "With `allocation`: that allocation's bytes from `offset`; `x-gantry-log-offset` says where the first byte is (later than asked when older output was rotated away). Without it: each allocation of the job in unit order, then attempt order, each after a line `==> ALLOCATION (unit U, attempt A) <==`. With `follow=true` the stream stays open until the allocation (or the job and each of its allocations) has ended and its last byte is sent; a stream that breaks off (the agent or the leader went away) ends without the final chunk. Any member answers; followers relay the leader's stream.",
                "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } },
                    { "name": "allocation", "in": "query", "required": false, "schema": { "type": "string" } },
                    { "name": "stream", "in": "query", "required": false, "schema": { "enum": ["stdout", "stderr"], "default": "stdout" } },
                    { "name": "offset", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0, "default": 0 }, "description": "Byte offset within the allocation's stream; needs `allocation`." },
                    { "name": "follow", "in": "query", "required": false, "schema": { "type": "boolean", "default": false } }],
                "responses": { "200": { "description": "The output.", "headers": {
                        "x-gantry-log-offset": { "schema": { "type": "integer" }, "description": "Offset of the first byte (with `allocation`)." },
                        "x-gantry-log-allocation": { "schema": { "type": "string" } } },
                        "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
                    "400": error_response("A bad parameter; `field` names it."),
                    "404": error_response("No such job, no such allocation of it, or its agent holds no output for it."),
                    "401": unauthorized.clone(),
                    "503": error_response("No leader, too many streams, or the allocation's agent is down, disconnected or did not answer in 5 s (the message names the agent).") } } },
            "/v1/endpoints": { "get": { "summary": "Serving jobs, their gateway paths and replicas, as this coordinator's gateway routes them (its applied state).",
                "responses": { "200": ok("Endpoints.", array_of("Endpoint")), "401": unauthorized.clone() } } },
            "/serve/{name}": gateway_path(),
            "/serve/{name}/": gateway_path(),
            "/serve/{name}/{*rest}": gateway_path(),
            "/v1/quotas": { "get": { "summary": "GPU quota per team.", "parameters": [stale_parameter()],
                "responses": { "200": ok("Team to GPUs.", json!({ "type": "object", "additionalProperties": { "type": "integer" } })), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/quotas/{team}": { "put": { "summary": "Set a team's GPU quota (null removes it).",
                "parameters": [{ "name": "team", "in": "path", "required": true, "schema": { "type": "string" } }],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "properties": { "gpus": { "type": ["integer", "null"] } } } } } },
                "responses": { "200": ok("Set.", json!({ "type": "object" })), "400": error_response("Bad team or body."), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/usage": { "get": { "summary": "GPU- and CPU-seconds and cost per step over a window ending now, per team and per site (with each site's idle cost and capacity), from allocations' run times at their nodes' prices.",
                "parameters": [
                    { "name": "window", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1, "maximum": 2678400 }, "description": "Seconds back from now (default 3600)." },
                    { "name": "step", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 1 }, "description": "Seconds per step (default window/60); at most 1,000 steps." },
                    stale_parameter()],
                "responses": { "200": ok("Usage per step.", json!({ "type": "object", "required": ["start_unix_ms", "step_ms", "steps", "teams", "sites"] })), "400": error_response("Bad window or step (the field is named)."), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/agents": { "get": { "summary": "Agents and their nodes.", "parameters": [stale_parameter()],
                "responses": { "200": ok("Agents.", array_of("Agent")), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/nodes": { "get": { "summary": "Every node of every agent.", "parameters": [stale_parameter()],
                "responses": { "200": ok("Nodes.", array_of("Node")), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/tokens": { "post": { "summary": "Create a join token.", "requestBody": { "required": true, "content": { "application/json": { "schema": schema("TokenRequest") } } },
                "responses": { "201": ok("The token.", schema("Token")), "400": error_response("Bad role or TTL."), "401": unauthorized.clone() } } },
            "/v1/cluster": { "get": { "summary": "Leader, term and members.", "parameters": [stale_parameter()],
                "responses": { "200": ok("The cluster.", schema("Cluster")), "401": unauthorized.clone(), "503": unavailable.clone() } } },
            "/v1/cluster/members/{id}": { "delete": { "summary": "Remove a member.", "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "integer" } }],
                "responses": { "200": ok("Removed.", json!({ "type": "object" })), "400": error_response("Not a node id."), "401": unauthorized, "503": unavailable } } }
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented() {
        let spec = super::spec();
        let paths = spec["paths"].as_object().unwrap();
        let routes = include_str!("mod.rs");
        for line in routes
            .lines()
            .filter(|l| l.trim_start().starts_with(".route(\""))
        {
            let path = line.split('"').nth(1).unwrap();
            assert!(
                paths.contains_key(path),
                "{path} is served but not in the OpenAPI document"
            );
        }
    }
}
