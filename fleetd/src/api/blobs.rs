//! Layers from peers (issue 12): the OCI distribution read routes
//! `GET`/`HEAD /v2/<name>/blobs/sha256:<64 hex>`, answered from this machine's image store
//! (`<store>/blobs/sha256/<hex>`), so that another machine's `unitctl image pull` can fetch
//! a blob here before it asks the registry.
//!
//! Content-addressed: the repository name is ignored, and the puller verifies every byte
//! against the digest whatever the source, so a peer can withhold a blob but not substitute
//! one. Read-only, and only on the TCP API: over mutual TLS for `OU=machine` certificates
//! only (a reader must not get image contents the registry protects with credentials), in
//! `--insecure` plaintext with the cluster's token; the Unix socket does not serve them.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{ApiState, ErrorBody};

/// The store fleetd serves by default (`fleetd --images`): init's writable store,
/// `flotilla_container::image::DEFAULT_STORE` (fleetd does not link the container crate).
pub const DEFAULT_IMAGES: &str = "/var/lib/flotilla/images";

/// The route prefix of the distribution API.
pub const V2: &str = "/v2";

/// The 64 lower-case hex digits of `sha256:<hex>`, or `None` for anything else.
pub fn digest_hex(digest: &str) -> Option<&str> {
    flotilla_units::sha256_hex(digest)
}

fn error(status: StatusCode, text: String) -> Response {
    (status, Json(ErrorBody { error: text })).into_response()
}

/// `GET`/`HEAD /v2/{*rest}`: `rest` must be `<name>/blobs/<digest>`.
pub(super) async fn blob(
    State(state): State<ApiState>,
    method: Method,
    UrlPath(rest): UrlPath<String>,
) -> Response {
    let Some(store) = state.blobs.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            "this listener serves no image blobs (fleetd serves them on its TCP API only)".into(),
        );
    };
    let Some((name, digest)) = rest.rsplit_once("/blobs/") else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no route {method} {V2}/{rest}: fleetd serves only {V2}/<name>/blobs/sha256:<64 hex>"
            ),
        );
    };
    if name.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{V2}/{rest}: the repository name is empty"),
        );
    }
    let Some(hex) = digest_hex(digest) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("bad blob digest {digest:?}: give sha256:<64 lower-case hex digits>"),
        );
    };
    serve_file(store, hex, digest, method == Method::HEAD).await
}

/// Where a blob may be: the store's `blobs/sha256/<hex>`, then a pull's staging directory
/// (`pull-tmp/<pid>-<nanos>/blobs/sha256/<hex>`: a blob downloaded and verified, not yet
/// imported; never a `.partial`), so that the machine that fetches an image for the others
/// serves each blob as soon as it has it.
fn candidates(store: &Path, hex: &str) -> Vec<PathBuf> {
    let mut v = vec![store.join("blobs").join("sha256").join(hex)];
    if let Ok(rd) = std::fs::read_dir(store.join(PULL_STAGING)) {
        for entry in rd.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                v.push(entry.path().join("blobs").join("sha256").join(hex));
            }
        }
    }
    v
}

/// The staging directory of pulls in a store (`flotilla_registry`'s).
const PULL_STAGING: &str = "pull-tmp";

async fn serve_file(store: &Path, hex: &str, digest: &str, head: bool) -> Response {
    let found = candidates(store, hex)
        .into_iter()
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()));
    let Some(path) = found else {
        return error(
            StatusCode::NOT_FOUND,
            format!("blob {digest} is not in this machine's image store"),
        );
    };
    // O_NOFOLLOW: a symlink planted in the store is never followed out of it.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return error(
                StatusCode::NOT_FOUND,
                format!("blob {digest} is not in this machine's image store"),
            )
        }
        Err(e) => {
            log::warn!("api: cannot open the blob {}: {e}", path.display());
            // A symlink (ELOOP) or an unreadable file: not served, as if absent.
            return error(
                StatusCode::NOT_FOUND,
                format!("blob {digest} is not served by this machine"),
            );
        }
    };
    let meta = match file.metadata() {
        Ok(m) if m.is_file() => m,
        Ok(_) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("blob {digest} is not served by this machine"),
            )
        }
        Err(e) => {
            log::warn!("api: cannot stat the blob {}: {e}", path.display());
            return error(
                StatusCode::NOT_FOUND,
                format!("blob {digest} is not served by this machine"),
            );
        }
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file),
            64 * 1024,
        ))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
    if let Ok(v) = HeaderValue::from_str(digest) {
        headers.insert("docker-content-digest", v);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::collections::BTreeSet;

    use super::{digest_hex, Claims};

    #[test]
    fn a_released_claim_goes_to_the_next_claimer_at_once() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let claims = Claims::default();
        assert!(claims.claim(&d, "http://m1", None).granted);
        let waiting = claims.claim(&d, "http://m2", None);
        assert!(!waiting.granted);
        assert_eq!(waiting.holder, "http://m1");
        // Only the holder releases its claim.
        assert!(!claims.release(&d, "http://m2"));
        assert!(!claims.claim(&d, "http://m3", None).granted, "still m1's");
        assert!(claims.release(&d, "http://m1"));
        assert!(!claims.release(&d, "http://m1"), "gone already");
        // The next claimer fetches it, and the others wait for that one.
        assert!(claims.claim(&d, "http://m2", None).granted);
        assert_eq!(claims.claim(&d, "http://m3", None).holder, "http://m2");
    }

    #[test]
    fn a_claim_whose_holder_left_the_cluster_goes_to_the_next_claimer() {
        let d = format!("sha256:{}", "cd".repeat(32));
        let claims = Claims::default();
        let live =
            |apis: &[&str]| -> BTreeSet<String> { apis.iter().map(|a| a.to_string()).collect() };
        let all = live(&["http://m1", "http://m2", "http://m3"]);
        assert!(claims.claim(&d, "http://m1/", Some(&all)).granted);
        // m1 is live (its URL with or without the slash): the others wait for it.
        let waiting = claims.claim(&d, "http://m2", Some(&all));
        assert!(!waiting.granted);
        assert_eq!(waiting.holder, "http://m1/");
        // Unknown liveness (the registry did not answer): the claim holds.
        assert!(!claims.claim(&d, "http://m2", None).granted);
        // m1 left the cluster: the next claimer is granted, and the others wait for it.
        let without_m1 = live(&["http://m2", "http://m3"]);
        assert!(claims.claim(&d, "http://m2", Some(&without_m1)).granted);
        assert_eq!(
            claims.claim(&d, "http://m3", Some(&without_m1)).holder,
            "http://m2"
        );
    }

    #[test]
    fn digests_are_strict() {
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(digest_hex(&format!("sha256:{hex}")), Some(hex.as_str()));
        for bad in [
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            format!("sha512:{hex}"),
            format!("sha256:../{}", &hex[3..]),
            hex.clone(),
        ] {
            assert_eq!(digest_hex(&bad), None, "{bad}");
        }
    }
}

/// How long a claim holds at its arbiter: the others wait for the holder at most about
/// this long before they go to the registry themselves.
pub const CLAIM_TTL: Duration = Duration::from_secs(300);

/// The image claims this fleetd arbitrates: image digest → (holder's API URL, since).
#[derive(Clone, Debug, Default)]
pub struct Claims(Arc<Mutex<HashMap<String, (String, Instant)>>>);

/// The body of `POST /v2/_flotilla/claims/<digest>`: who asks to fetch the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// The asking machine's API URL (where the others will fetch its blobs).
    pub holder: String,
}

/// The answer: who fetches the image from the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// The machine that holds the claim (the asker when `granted`).
    pub holder: String,
    /// Whether the asker holds it now.
    pub granted: bool,
}

impl Claims {
    /// Grants `digest` to `holder` unless another holder's claim is younger than
    /// [`CLAIM_TTL`] and that holder is live; answers the holder. `live`: the API URLs of
    /// the registry's live machines (a machine leaves when its lease ends), `None` when
    /// they are not known (the registry did not answer): a claim whose holder is not among
    /// them is dropped (its machine died or left mid-pull, so its blobs will never come),
    /// and the asker fetches the image instead of waiting for the claim to expire.
    pub fn claim(
        &self,
        digest: &str,
        holder: &str,
        live: Option<&BTreeSet<String>>,
    ) -> ClaimAnswer {
        let now = Instant::now();
        let Ok(mut map) = self.0.lock() else {
            // A poisoned lock (a panic elsewhere): grant, the asker fetches itself.
            return ClaimAnswer {
                holder: holder.to_string(),
                granted: true,
            };
        };
        map.retain(|_, (_, since)| now.duration_since(*since) < CLAIM_TTL);
        if let (Some((h, _)), Some(live)) = (map.get(digest), live) {
            if h != holder && !live.contains(h.trim_end_matches('/')) {
                log::info!(
                    "api: image {digest}: its holder {h} is no live machine's API: claim dropped"
                );
                map.remove(digest);
            }
        }
        match map.get(digest) {
            Some((h, _)) if h != holder => ClaimAnswer {
                holder: h.clone(),
                granted: false,
            },
            _ => {
                map.insert(digest.to_string(), (holder.to_string(), now));
                ClaimAnswer {
                    holder: holder.to_string(),
                    granted: true,
                }
            }
        }
    }

    /// Ends `holder`'s claim of `digest` (its pull failed): the next machine to claim the
    /// image is granted it at once instead of after [`CLAIM_TTL`]. Only the holder's own
    /// claim is removed; returns whether there was one.
    pub fn release(&self, digest: &str, holder: &str) -> bool {
        let Ok(mut map) = self.0.lock() else {
            return false;
        };
        if map.get(digest).is_some_and(|(h, _)| h == holder) {
            map.remove(digest);
            true
        } else {
            false
        }
    }
}

/// The digest and body of a claim request (`METHOD /v2/_flotilla/claims/<digest>`), or the
/// error to answer: 404 off the TCP API or on another path, 400 for a bad digest or body.
fn claim_request<'r>(
    state: &ApiState,
    method: &str,
    rest: &'r str,
    body: Result<Json<ClaimRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(&'r str, ClaimRequest), (StatusCode, String)> {
    if state.blobs.is_none() {
        return Err((
            StatusCode::NOT_FOUND,
            "this listener arbitrates no image claims (fleetd does on its TCP API only)".into(),
        ));
    }
    let Some(digest) = rest.strip_prefix("_flotilla/claims/") else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no route {method} {V2}/{rest}: see {V2}/_flotilla/claims/sha256:<64 hex>"),
        ));
    };
    if digest_hex(digest).is_none() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("bad image digest {digest:?}: give sha256:<64 lower-case hex digits>"),
        ));
    }
    let Ok(Json(req)) = body else {
        return Err((
            StatusCode::BAD_REQUEST,
            "bad claim body: send {\"holder\": \"<your API URL>\"}".into(),
        ));
    };
    Ok((digest, req))
}

/// `POST /v2/_flotilla/claims/<digest>`: one fetch per image in a rollout. The machines
/// that pull the same image pick the same arbiter (the puller's rendezvous hash over the
/// cluster's APIs); the first to claim the image fetches it from the registry, the others
/// fetch its blobs from that machine as it gets them.
pub(super) async fn claim(
    State(state): State<ApiState>,
    UrlPath(rest): UrlPath<String>,
    body: Result<Json<ClaimRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (digest, req) = match claim_request(&state, "POST", &rest, body) {
        Ok(c) => c,
        Err((status, text)) => return error(status, text),
    };
    // The live machines' APIs, to drop a dead holder's claim; unknown when the registry
    // does not answer (then a claim holds until it expires, as before).
    let live = match state.registry.list_machines().await {
        Ok(l) => Some(
            l.items
                .iter()
                .filter_map(|m| m.api.as_deref())
                .map(|a| a.trim_end_matches('/').to_string())
                .collect::<BTreeSet<String>>(),
        ),
        Err(e) => {
            log::warn!("api: image {digest}: cannot list the live machines ({e}); claims hold until they expire");
            None
        }
    };
    let answer = state.claims.claim(digest, &req.holder, live.as_ref());
    log::info!(
        "api: image {digest} claimed by {} ({})",
        answer.holder,
        if answer.granted {
            "granted"
        } else {
            "asked by another"
        }
    );
    Json(answer).into_response()
}

/// `DELETE /v2/_flotilla/claims/<digest>` with the claim's body (`{"holder": ...}`): the
/// holder's pull failed, so the machines waiting for its blobs re-claim the image (one of
/// them fetches it from the registry) instead of waiting for the claim to expire. Answers
/// `{"released": bool}` (false: the claim was not that holder's, or is gone already).
pub(super) async fn release(
    State(state): State<ApiState>,
    UrlPath(rest): UrlPath<String>,
    body: Result<Json<ClaimRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (digest, req) = match claim_request(&state, "DELETE", &rest, body) {
        Ok(c) => c,
        Err((status, text)) => return error(status, text),
    };
    let released = state.claims.release(digest, &req.holder);
    log::info!(
        "api: image {digest} released by {} ({})",
        req.holder,
        if released {
            "the next claimer fetches it"
        } else {
            "it held no claim"
        }
    );
    Json(serde_json::json!({ "released": released })).into_response()
}
