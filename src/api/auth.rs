//! Who may call what: bearer tokens with scopes, checked before a route's handler runs. The scope each
//! operation needs is its `security` in the OpenAPI document (the `#[utoipa::path]` attribute), so the
//! document and the check cannot disagree. With no tokens configured only loopback peers are served.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;

use super::error::{documented_refusal, refusal_for, ApiError};
use crate::core::caller;

/// The name of the security scheme in the OpenAPI document.
pub const BEARER: &str = "bearer";

/// What a token may do; an operation names the one it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Classify, compare, read models, versions, aliases and jobs.
    Infer,
    /// Exemplars, textures, datasets, edits, statistics, evaluations, aliases.
    Edit,
    /// Load and unload models, delete versions and exemplars, read the audit log.
    Admin,
}

impl Scope {
    const ALL: [Scope; 3] = [Scope::Infer, Scope::Edit, Scope::Admin];

    fn name(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Edit => "edit",
            Scope::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Scope::ALL.into_iter().find(|scope| scope.name() == text)
    }
}

struct Token {
    name: String,
    scopes: Vec<Scope>,
    /// The token's sha256: the secret itself is not kept.
    digest: [u8; 32],
}

/// The configured tokens. Each line of the file (or of `EDITSERVE_TOKENS`, where `;` also ends a line) is
/// `NAME SCOPES SECRET`: SCOPES comma-separated from `infer`, `edit`, `admin`; SECRET the token itself or
/// `sha256:` and its digest in hex, so that the file need not hold secrets. `#` starts a comment.
pub struct Tokens(Vec<Token>);

impl Tokens {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (number, line) in text.split(['\n', ';']).enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, scopes, secret] = fields[..] else {
                return Err(format!("token entry {}: expected NAME SCOPES SECRET", number + 1));
            };
            let scopes = scopes
                .split(',')
                .map(|s| Scope::parse(s).ok_or_else(|| format!("token '{name}': unknown scope '{s}'")))
                .collect::<Result<Vec<_>, _>>()?;
            let digest = match secret.strip_prefix("sha256:") {
                Some(hex) => parse_digest(hex).ok_or_else(|| format!("token '{name}': sha256: wants 64 hex digits"))?,
                None => Sha256::digest(secret.as_bytes()).into(),
            };
            if tokens.iter().any(|t: &Token| t.name == name) {
                return Err(format!("token '{name}' is configured twice"));
            }
            tokens.push(Token { name: name.to_string(), scopes, digest });
        }
        if tokens.is_empty() {
            return Err("no tokens in the token configuration".into());
        }
        Ok(Self(tokens))
    }

    /// The token whose secret this is. Every configured digest is compared, in constant time.
    fn find(&self, secret: &str) -> Option<&Token> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for token in &self.0 {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// The check every routed request passes.
pub struct Access {
    /// None: no tokens, loopback peers only.
    tokens: Option<Tokens>,
    /// The scope of each protected operation, by method and route template.
    needs: HashMap<(Method, String), Scope>,
    /// Whether `/metrics` wants a token (any configured one).
    protect_metrics: bool,
    /// How much of a refused request's body is read before the answer.
    drain_limit: usize,
    /// Each token's requests in flight (until their answer's body ends, so event streams count too).
    in_flight: HashMap<String, Arc<Semaphore>>,
    concurrent_per_token: usize,
}

/// What `Access::new` needs besides the tokens and the document.
pub struct AccessLimits {
    pub protect_metrics: bool,
    pub drain_limit: usize,
    pub concurrent_per_token: usize,
}

impl Access {
    pub fn new(tokens: Option<Tokens>, document: &OpenApi, limits: AccessLimits) -> Self {
        let mut needs = HashMap::new();
        for (method, path, operation) in super::operations(document) {
            let scope = operation.security.iter().flatten().find_map(|requirement| {
                let value = serde_json::to_value(requirement).ok()?;
                value.get(BEARER)?.as_array()?.iter().find_map(|s| Scope::parse(s.as_str()?))
            });
            if let Some(scope) = scope {
                needs.insert((method, path.to_string()), scope);
            }
        }
        let in_flight = tokens.iter().flat_map(|tokens| &tokens.0);
        let in_flight = in_flight.map(|t| (t.name.clone(), Arc::new(Semaphore::new(limits.concurrent_per_token))));
        Self {
            in_flight: in_flight.collect(),
            tokens,
            needs,
            protect_metrics: limits.protect_metrics,
            drain_limit: limits.drain_limit,
            concurrent_per_token: limits.concurrent_per_token,
        }
    }

    fn check(&self, request: &Request, peer: Option<IpAddr>) -> Result<Option<String>, ApiError> {
        let route = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or_default();
        // HEAD runs the GET handler (axum drops the body): it needs what GET needs.
        let method = if request.method() == Method::HEAD { Method::GET } else { request.method().clone() };
        let need = self.needs.get(&(method, route.to_string())).copied();
        let metrics = self.protect_metrics && route == "/metrics";
        if need.is_none() && !metrics {
            return Ok(None);
        }
        let Some(tokens) = &self.tokens else {
            return match peer {
                Some(ip) if ip.is_loopback() => Ok(None),
                _ => Err(ApiError::Forbidden(
                    "this server has no tokens configured and serves only loopback clients (see --tokens-file)".into(),
                )),
            };
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let Some(presented) = presented else {
            return Err(ApiError::Unauthorized("send 'Authorization: Bearer <token>'".into()));
        };
        let token = tokens.find(presented).ok_or_else(|| ApiError::Unauthorized("unknown token".into()))?;
        if let Some(need) = need {
            if !token.scopes.contains(&need) {
                return Err(ApiError::Forbidden(format!(
                    "token '{}' lacks the scope '{}' this operation needs",
                    token.name,
                    need.name()
                )));
            }
        }
        Ok(Some(token.name.clone()))
    }
}

/// Refuses what the caller may not do; runs the rest with the token's name as the caller the audit log
/// records.
pub async fn authorize(
    State(access): State<Arc<Access>>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    request: Request,
    next: Next,
) -> Response {
    // Without the peer's address (a router used without a socket) the loopback rule refuses.
    let peer = peer.ok().map(|ConnectInfo(address)| address.ip());
    let refusal = match access.check(&request, peer) {
        Ok(None) => return next.run(request).await,
        Ok(Some(name)) => match access.in_flight.get(&name).map(|s| Arc::clone(s).try_acquire_owned()) {
            Some(Ok(permit)) => {
                let response = caller::scope(name, next.run(request)).await;
                // The permit goes when the body has been sent (or dropped): a stream holds it while it lasts.
                return response.map(|body| {
                    let stream = body.into_data_stream().map(move |chunk| {
                        let _held = &permit;
                        chunk
                    });
                    Body::from_stream(stream)
                });
            }
            _ => ApiError::TooManyRequests(format!(
                "token '{name}' has {} requests in flight, the most it may (--max-concurrent-per-token); retry \
                 when one ends",
                access.concurrent_per_token
            )),
        },
        Err(refusal) => refusal,
    };
    // Read what the client is still sending (within the body limit): answering and closing while it sends
    // makes it see a reset instead of the refusal.
    let path = request.uri().path().to_string();
    let _ = axum::body::to_bytes(request.into_body(), access.drain_limit).await;
    refusal_for(&path, refusal)
}

/// The `bearer` security scheme in the document's components.
pub struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, document: &mut OpenApi) {
        let components = document.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "A token from --tokens-file or EDITSERVE_TOKENS; the scope an operation needs is its requirement. \
                 With no tokens configured, loopback clients need none and other peers are refused.",
            ))
            .build();
        components.add_security_scheme(BEARER, SecurityScheme::Http(scheme));
        // Every protected operation can be refused before its handler runs.
        let refusals = [
            ("401", "`unauthorized`: no token or an unknown one (`WWW-Authenticate: Bearer`)"),
            ("403", "`forbidden`: the token lacks the scope, or a non-loopback peer while no tokens are configured"),
            ("429", "`too_many_requests`: the token's requests in flight are at the limit (`Retry-After`)"),
        ];
        for (path, operation) in super::operations_mut(document).filter(|(_, o)| o.security.is_some()) {
            for (status, description) in refusals {
                operation.responses.responses.insert(status.to_string(), documented_refusal(path, description));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_plain_and_hashed_secrets_and_refuse_bad_entries() {
        let hashed = format!("{:x}", Sha256::digest(b"s3cret"));
        let tokens =
            Tokens::parse(&format!("# ops\nci infer,edit abc\nops admin sha256:{hashed}; viewer infer xyz")).unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens.find("abc").map(|t| t.name.as_str()), Some("ci"));
        assert_eq!(tokens.find("s3cret").map(|t| t.scopes.clone()), Some(vec![Scope::Admin]));
        assert!(tokens.find("abd").is_none());
        assert!(Tokens::parse("ci root abc").is_err(), "unknown scope");
        assert!(Tokens::parse("ci infer").is_err(), "missing secret");
        assert!(Tokens::parse("ci infer sha256:12").is_err(), "short digest");
        assert!(Tokens::parse("a infer x\na edit y").is_err(), "a name twice");
        assert!(Tokens::parse("# nothing").is_err());
    }
}
