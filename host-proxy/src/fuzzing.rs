//! Entry points for the fuzz targets under `fuzz/` (feature `fuzzing`): the
//! checks every guest-supplied decision goes through and the merge that
//! applies it, and the header view a guest is shown, on arbitrary input.

use http::Request;

use crate::chain::Plan;
use crate::runtime::RequestView;
use crate::runtime::types::Protocol;

fn plain_request(parts: http::request::Parts) -> RequestView {
    RequestView {
        parts,
        scheme: "http",
        authority: Some(http::uri::Authority::from_static("reviews")),
        port: 80,
        protocol: Protocol::Http1,
        source_address: "127.0.0.1:50000".into(),
        source_principal: None,
        service: "reviews".into(),
        id: http::HeaderValue::from_static("fuzz"),
        holds: Default::default(),
    }
}

/// A guest's `on-request` decision made from fuzz bytes, applied to a plain
/// GET as the proxy applies it: the host's caps and checks, then the merge.
/// Never panics; what it accepts is valid HTTP.
pub fn request_decision(data: &[u8]) {
    let Ok(d) = crate::runtime::fuzzing::decision(data) else {
        return;
    };
    let (parts, ()) = Request::get("/").body(()).unwrap().into_parts();
    let mut req = plain_request(parts);
    let mut plan = Plan::default();
    let mut edits = Vec::new();
    if let Some(reply) = plan.merge(&mut req, &mut edits, std::borrow::Cow::Owned(d)) {
        assert!((200..=599).contains(&reply.status.as_u16()));
    }
    if let Some(d) = plan.delay {
        assert!(d <= crate::runtime::MAX_WAIT);
    }
}

/// A request head (as hyper would accept it) → the host's view of its
/// headers (what `headers()` hands a guest) → a decision that sets them
/// all back on an empty request: the same headers come out, in order; a
/// value that is not UTF-8 comes back as its lossy text.
pub fn head_roundtrip(head: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut b = Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let (parts, ()) = req.into_parts();
    let original = parts.headers.clone();
    let view = crate::runtime::fuzzing::view(&original);
    assert_eq!(view.len(), original.len());
    let d = crate::runtime::fuzzing::set_all(view)
        .expect("headers the host showed a guest are valid to set back");
    let (empty, ()) = Request::get("/").body(()).unwrap().into_parts();
    let mut rebuilt = plain_request(empty);
    assert!(
        Plan::default()
            .merge(&mut rebuilt, &mut Vec::new(), std::borrow::Cow::Owned(d))
            .is_none()
    );
    assert_eq!(rebuilt.parts.headers.len(), original.len());
    for ((n1, v1), (n2, v2)) in original.iter().zip(rebuilt.parts.headers.iter()) {
        assert_eq!(n1, n2);
        assert_eq!(
            crate::http::headers::lossy(v1),
            crate::http::headers::lossy(v2)
        );
        if v1.to_str().is_ok() {
            assert_eq!(v1, v2);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The fuzzers' seed and found corpora, replayed as the targets run them
    /// (`fuzz/fuzz_targets/decision.rs`, `head_roundtrip.rs`).
    #[test]
    fn the_decision_and_head_fuzz_corpora_replay() {
        for (target, run) in [
            ("decision", super::request_decision as fn(&[u8])),
            ("head_roundtrip", super::head_roundtrip),
        ] {
            let dir = format!("{}/../fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                run(&std::fs::read(entry.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n >= 2, "the corpus is missing ({n} files in {dir})");
        }
    }
}
