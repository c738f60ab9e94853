//! openapi.yaml is the document the code generates (`make openapi` rewrites it), and it describes what the
//! server does: every error code, and each operation's answers.

#[test]
fn openapi_yaml_is_the_generated_document() {
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let generated = editserve::api::openapi().to_yaml().unwrap();
    assert!(checked_in == generated, "openapi.yaml is stale: run `make openapi` and commit it");
}

#[test]
fn the_document_lists_every_error_code_and_route() {
    let document = serde_json::to_value(editserve::api::openapi()).unwrap();
    let codes = &document["components"]["schemas"]["ErrorCode"]["enum"];
    for code in ["model_not_found", "payload_too_large", "method_not_allowed", "idempotency_key_reused", "not_found"] {
        assert!(codes.as_array().unwrap().iter().any(|c| c == code), "{code} missing from {codes}");
    }
    let paths = document["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 34, "{:?}", paths.keys().collect::<Vec<_>>());
    let versions = &paths["/v1/models/{name}/versions"];
    assert!(versions["post"]["responses"]["202"].is_object());
    assert_eq!(
        versions["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/EditRequest"
    );
    assert_eq!(document["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // Every error answer is the one error body (the Open Inference Protocol's own shape on its routes); every
    // /v1 and /v2 operation but health needs a scope and can answer 401 and 403.
    for (path, item) in paths {
        let health = path.starts_with("/v2/health/") || path == "/readyz";
        for (method, operation) in item.as_object().unwrap() {
            if (path.starts_with("/v1/") || path.starts_with("/v2")) && !health {
                let scopes = &operation["security"][0]["bearer"];
                assert!(["infer", "edit", "admin"].iter().any(|s| scopes[0] == *s), "{method} {path}: {scopes}");
                assert!(operation["responses"]["401"].is_object() && operation["responses"]["403"].is_object());
            }
            for (status, response) in operation["responses"].as_object().unwrap() {
                if (status.starts_with('4') || status.starts_with('5')) && !health {
                    let body = if path.starts_with("/v2") { "ProtocolErrorBody" } else { "ErrorBody" };
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, &format!("#/components/schemas/{body}"), "{method} {path} {status}");
                }
            }
        }
    }
}
