//! The API's OpenAPI 3.1 document, served at `/openapi.json`. Each operation is described by the
//! `#[utoipa::path]` annotation on its handler in `api.rs`; this module gathers them with the
//! shared error answers and the bearer scheme. A unit test checks that every route of the
//! router is described and nothing else, so the document cannot drift from the code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// Every error ckptd answers: a stable machine-readable code and a message for people.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// `bad_request`, `invalid_job`, `not_found`, `unauthorized`, `over_quota`, `busy`, ...
    code: String,
    message: String,
}

/// The refusals any operation may answer.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum Refusals {
    /// Invalid input: a name, step, hash, body or query that cannot be used.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No credentials, or credentials that name no tenant.
    #[response(status = 401, headers(("WWW-Authenticate" = String)))]
    Unauthorized(ErrorBody),
    /// Admin-only operation.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such job, checkpoint, save, chunk or endpoint (another tenant's job included).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// A request body that stopped arriving.
    #[response(status = 408)]
    Stalled(ErrorBody),
    /// Conflicts with the state: an aborted save, a fenced writer, a pinned checkpoint.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// A body over its configured limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The tenant is over a quota or its request rate.
    #[response(status = 429, headers(("Retry-After" = u64, description = "seconds")))]
    OverQuota(ErrorBody),
    /// Busy (staging full, slots taken) or the store is failing transiently.
    #[response(status = 503, headers(("Retry-After" = u64, description = "seconds")))]
    Busy(ErrorBody),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Examples for the path parameters of reads that name a checkpoint, all in one place: the
/// trainer's default job, its newest checkpoint (`latest`, or step 1). A reader gets a request
/// that works against a trainer's first run, and the API fuzzing (`.ci/schemathesis`) saves
/// such a job first, so these requests reach stored checkpoints and their answers' schemas are
/// checked on real bodies, not only on 404s. Only reads (GET): a document's "try it out"
/// must not come with a delete or a fence of the trainer's job filled in.
struct PathExamples;

impl Modify for PathExamples {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{Schema, SchemaType, Type};
        use utoipa::openapi::RefOr;
        for item in openapi.paths.paths.values_mut() {
            for param in item.get.iter_mut().flat_map(|op| op.parameters.iter_mut().flatten()) {
                if param.parameter_in != ParameterIn::Path {
                    continue;
                }
                let is_string = matches!(
                    &param.schema,
                    Some(RefOr::T(Schema::Object(o))) if o.schema_type == SchemaType::Type(Type::String)
                );
                let example = match (param.name.as_str(), is_string) {
                    ("job", _) => serde_json::json!(EXAMPLE_JOB),
                    ("step", true) => serde_json::json!("latest"),
                    ("step", false) => serde_json::json!(1),
                    _ => continue,
                };
                *param = ParameterBuilder::from(param.clone()).example(Some(example)).build();
            }
        }
    }
}

/// The job the path examples name: the trainer's default (`ckpt-train launch --job`).
pub const EXAMPLE_JOB: &str = "llama-tiny";

#[derive(OpenApi)]
#[openapi(
    info(title = "ckptd", description = "The ckpt checkpoint service's HTTP API."),
    modifiers(&BearerAuth, &PathExamples),
    security(("bearer" = [])),
    components(schemas(ErrorBody, ErrorDetail)),
    paths(
        crate::api::healthz,
        crate::api::readyz,
        crate::api::openapi_json,
        crate::api::list_jobs,
        crate::api::stats,
        crate::api::metrics,
        crate::api::faults_report,
        crate::api::arm_fault,
        crate::api::local_paths,
        crate::api::list_checkpoints,
        crate::api::get_manifest,
        crate::api::delete_checkpoint,
        crate::api::get_index_object,
        crate::api::pin_checkpoint,
        crate::api::unpin_checkpoint,
        crate::api::gc_job,
        crate::api::gc_all,
        crate::api::missing_chunks,
        crate::api::put_chunk,
        crate::api::get_chunk,
        crate::api::adopt_chunk,
        crate::api::adopt_segment_chunk,
        crate::api::open_save,
        crate::api::save_status,
        crate::api::abort_save,
        crate::api::raise_fence,
        crate::api::put_shard_index,
    )
)]
pub struct ApiDoc;

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every (method, route) of the router is in the document, and the document has nothing
    /// else.
    #[test]
    fn the_document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::document()).unwrap();
        let mut described = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch", "head"].contains(&method.as_str()) {
                    described.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let api = include_str!("api.rs");
        let mut routed = BTreeSet::new();
        for route in api.split(".route(").skip(1) {
            let path = route.split('"').nth(1).unwrap().to_string();
            // The method routers up to the next route (or the router's own layers).
            let end = route.find("\n        .").unwrap_or(route.len());
            for m in ["get", "put", "post", "delete"] {
                if route[..end].contains(&format!("{m}(")) && !route[..end].contains(&format!("_{m}(")) {
                    routed.insert((m.to_uppercase(), path.clone()));
                }
            }
        }
        assert!(routed.len() > 20, "cannot read the router: {routed:?}");
        assert_eq!(described, routed, "the OpenAPI document and the router differ");
        for (_, item) in doc["paths"].as_object().unwrap() {
            for (_, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("401") && responses.contains_key("429"), "{op}");
            }
        }
    }

    /// Every path parameter of a read naming a job or a step has an example of its schema's
    /// type, and no other operation has one.
    #[test]
    fn the_path_parameters_of_reads_have_examples() {
        let doc: serde_json::Value = serde_json::from_str(super::document()).unwrap();
        let mut seen = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let name = p["name"].as_str().unwrap();
                    if method != "get" {
                        assert!(p.get("example").is_none(), "{method} {path}: {name} has an example");
                        continue;
                    }
                    if p["in"] != "path" || !["job", "step"].contains(&name) {
                        continue;
                    }
                    let (example, ty) = (&p["example"], p["schema"]["type"].as_str().unwrap_or_default());
                    let fits = match ty {
                        "string" => example.is_string(),
                        "integer" => example.is_u64(),
                        _ => false,
                    };
                    assert!(fits, "{method} {path}: {name} has example {example} for a schema of type {ty:?}");
                    seen.insert((name.to_string(), example.to_string()));
                }
            }
        }
        let want = [("job", "\"llama-tiny\""), ("step", "\"latest\""), ("step", "1")];
        assert_eq!(seen, want.iter().map(|(n, e)| (n.to_string(), e.to_string())).collect());
    }
}
