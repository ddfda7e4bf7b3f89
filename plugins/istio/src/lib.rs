//! Istio's configuration vocabulary, shared by wasmesh's stock plugins (a
//! plugin-side library, compiled into each plugin): `StringMatch`,
//! `HTTPMatchRequest` and their compiled matchers, durations as Istio and
//! protobuf write them, and percentages. The proxy uses the same matchers
//! for a chain entry's `match` ([`parse_matches`]), so a plugin scoped by
//! the host and a route in `builtin:router` read a match alike.

use std::collections::BTreeMap;

use regex_lite::Regex;
use serde::{Deserialize, Serialize};
use wasmesh_plugin_sdk::{Request, RequestDecision, RequestTable};

/// Istio `StringMatch`: at most one of exact, prefix, regex (RE2 syntax,
/// matched against the whole value). None of them: the value is present.
///
/// Regexes run on `regex-lite`: linear time, and ASCII `\d`, `\w`, `\s`
/// and ASCII `(?i)`, as in RE2; RE2's Unicode classes (`\p{Greek}`) are
/// refused at configure time. It keeps each plugin that matches strings
/// about a third the size it is with the full `regex` crate (compiled plugin
/// code is resident in every sidecar).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    /// Equal to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starts with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Matches this regular expression in full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Istio `HTTPMatchRequest`: every given condition must hold.
/// Serialised (as the JSON it was read from, absent fields left out) for
/// a plugin's `on-request-table`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchRequest {
    /// A name, for logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The path (without the query string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// `http` or `https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// The method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// The authority (`Host`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Headers (lowercase names) that must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameters that must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Headers that must *not* match (an empty match: must be absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Match `uri` case-insensitively.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// The destination port the client addressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A compiled `StringMatch`.
pub enum Matcher {
    /// Any value (present).
    Any,
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole-value regex.
    Regex(Regex),
}

impl Matcher {
    /// Compile; `path` names the field in errors.
    pub fn new(m: &StringMatch, path: &str, fold_case: bool) -> Result<Self, String> {
        let given = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(format!("{path}: give one of exact, prefix, regex"));
        }
        let fold = |s: &String| {
            if fold_case {
                s.to_lowercase()
            } else {
                s.clone()
            }
        };
        Ok(match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), _, _) => Matcher::Exact(fold(e)),
            (_, Some(p), _) => Matcher::Prefix(fold(p)),
            (_, _, Some(r)) => {
                let full = if fold_case {
                    format!("(?i)^(?:{r})$")
                } else {
                    format!("^(?:{r})$")
                };
                Matcher::Regex(
                    regex_lite::RegexBuilder::new(&full)
                        .size_limit(1 << 20)
                        .build()
                        .map_err(|e| format!("{path}.regex: {e}"))?,
                )
            }
            _ => Matcher::Any,
        })
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::Exact(e) => v == e,
            Matcher::Prefix(p) => v.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(v),
        }
    }
}

/// A compiled `HTTPMatchRequest`.
pub struct Condition {
    uri: Option<Matcher>,
    uri_prefix: Option<String>,
    fold_uri: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    query: Vec<(String, Matcher)>,
    without: Vec<(String, Matcher)>,
    port: Option<u16>,
}

impl Condition {
    /// Compile a match; `at` names it in errors (`config.http[0].match[1]`).
    pub fn new(m: &MatchRequest, at: &str) -> Result<Self, String> {
        let opt =
            |s: &Option<StringMatch>, f: &str, fold: bool| -> Result<Option<Matcher>, String> {
                s.as_ref()
                    .map(|s| Matcher::new(s, &format!("{at}.{f}"), fold))
                    .transpose()
            };
        let map = |m: &BTreeMap<String, StringMatch>,
                   f: &str,
                   lower: bool|
         -> Result<Vec<(String, Matcher)>, String> {
            m.iter()
                .map(|(k, v)| {
                    let key = if lower {
                        k.to_ascii_lowercase()
                    } else {
                        k.clone()
                    };
                    Ok((key, Matcher::new(v, &format!("{at}.{f}.{k}"), false)?))
                })
                .collect()
        };
        Ok(Self {
            uri: opt(&m.uri, "uri", m.ignore_uri_case)?,
            uri_prefix: m.uri.as_ref().and_then(|u| u.prefix.clone()),
            fold_uri: m.ignore_uri_case,
            scheme: opt(&m.scheme, "scheme", false)?,
            method: opt(&m.method, "method", false)?,
            authority: opt(&m.authority, "authority", false)?,
            headers: map(&m.headers, "headers", true)?,
            query: map(&m.query_params, "queryParams", false)?,
            without: map(&m.without_headers, "withoutHeaders", true)?,
            port: m.port,
        })
    }

    /// The `uri.prefix` this match tests, if any (for a prefix rewrite).
    pub fn uri_prefix(&self) -> Option<&str> {
        self.uri_prefix.as_deref()
    }

    /// Whether the request matches; `path` is its path without the query.
    pub fn matches(&self, req: &Request<'_>, path: &str) -> bool {
        if let Some(m) = &self.uri {
            let ok = if self.fold_uri {
                m.matches(&path.to_lowercase())
            } else {
                m.matches(path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(p) = self.port
            && req.port() != p
        {
            return false;
        }
        if let Some(m) = &self.method
            && !m.matches(&req.method())
        {
            return false;
        }
        if let Some(m) = &self.scheme
            && !m.matches(&req.scheme())
        {
            return false;
        }
        if let Some(m) = &self.authority
            && !m.matches(&req.authority())
        {
            return false;
        }
        for (name, m) in &self.headers {
            match req.header(name) {
                Some(v) if m.matches(&v) => {}
                _ => return false,
            }
        }
        for (name, m) in &self.without {
            if req.header(name).is_some_and(|v| m.matches(&v)) {
                return false;
            }
        }
        if !self.query.is_empty() {
            let full = req.path();
            let query = full.split_once('?').map_or("", |(_, q)| q);
            for (name, m) in &self.query {
                let value = query.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                });
                match value {
                    Some(v) if m.matches(v) => {}
                    _ => return false,
                }
            }
        }
        true
    }
}

/// Parse a duration as Istio and protobuf write them (`2s`, `250ms`,
/// `0.25s`, `1m`, `1h`) into milliseconds, with wasmesh's one duration
/// grammar (`wasmesh_units`, the mesh file's too); `path` names the field in
/// errors.
pub fn duration_ms(t: &str, path: &str) -> Result<u32, String> {
    let d = wasmesh_units::parse_duration(t).map_err(|e| format!("{path}: {e}"))?;
    u32::try_from(d.as_millis()).map_err(|_| format!("{path}: {t:?} is out of range"))
}

/// Istio `Percent`: `{ value: 12.5 }`, 0 to 100.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    /// The percentage.
    pub value: f64,
}

impl Percent {
    /// Check the range; `path` names the field in errors.
    pub fn check(&self, path: &str) -> Result<(), String> {
        if (0.0..=100.0).contains(&self.value) {
            Ok(())
        } else {
            Err(format!(
                "{path}.value: {} is not a percentage (0 to 100)",
                self.value
            ))
        }
    }

    /// Draw: true with this probability.
    pub fn hit(&self) -> bool {
        self.value >= 100.0
            || (self.value > 0.0 && wasmesh_plugin_sdk::host::random_f64() * 100.0 < self.value)
    }
}

/// Parse and compile a table rule's `when` (`on-request-table`) as its
/// text gives it: empty is every request (`[]`), anything else a JSON list
/// of HTTPMatchRequests. Returns the JSON (what `/config` shows) and the
/// compiled conditions; `at` is its path in errors (`rules[1].when`).
pub fn parse_when(text: &str, at: &str) -> Result<(serde_json::Value, Vec<Condition>), String> {
    let json = match text.trim() {
        "" => serde_json::Value::Array(Vec::new()),
        text => serde_json::from_str(text)
            .map_err(|e| format!("{at}: not JSON ({e}); expected a list of HTTPMatchRequest"))?,
    };
    let conditions = parse_matches(&json, at)?;
    Ok((json, conditions))
}

/// Parse and compile a `match` list given as JSON (a chain entry's, as the
/// proxy and control read it); `at` is the list's path in errors
/// (`services.reviews.plugins[0].match[1].uri: unknown field ...`).
pub fn parse_matches(json: &serde_json::Value, at: &str) -> Result<Vec<Condition>, String> {
    let matches: Vec<MatchRequest> = serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let what = e.inner().to_string();
        match path.as_str() {
            "." => format!("{at}: {what} (expected a list of HTTPMatchRequest)"),
            p if p.starts_with('[') => format!("{at}{p}: {what}"),
            p => format!("{at}.{p}: {what}"),
        }
    })?;
    conditions(&matches, at)
}

/// Compile the `match` list of a route or fault; `at` is the list's path.
/// An empty list matches everything.
pub fn conditions(matches: &[MatchRequest], at: &str) -> Result<Vec<Condition>, String> {
    matches
        .iter()
        .enumerate()
        .map(|(j, m)| Condition::new(m, &format!("{at}[{j}]")))
        .collect()
}

/// Whether `req` is in the scope `conditions` give (none: every request),
/// matching its path without the query string.
pub fn in_scope(conditions: &[Condition], req: &Request<'_>) -> bool {
    if conditions.is_empty() {
        return true;
    }
    let full = req.path();
    let path = full.split_once('?').map_or(full.as_str(), |(p, _)| p);
    first_match(conditions, req, path).is_some()
}

/// The first condition that matches (by index), or `Some(None)` when there
/// are none; `None` when none matches.
pub fn first_match(
    conditions: &[Condition],
    req: &Request<'_>,
    path: &str,
) -> Option<Option<usize>> {
    if conditions.is_empty() {
        return Some(None);
    }
    conditions
        .iter()
        .position(|c| c.matches(req, path))
        .map(Some)
}

/// The decisions `table` may give `req`, as the proxy evaluates an
/// `on-request-table` (the same matcher, the first rule that holds, its
/// decisions with a weight above 0; `otherwise` when none holds): for a
/// plugin's tests, to check its table against its `on_request`. An error
/// names a rule whose `when` does not parse.
pub fn table_decisions(
    table: &RequestTable,
    req: &Request<'_>,
) -> Result<Vec<RequestDecision>, String> {
    let full = req.path();
    let path = full.split_once('?').map_or(full.as_str(), |(p, _)| p);
    for (i, rule) in table.rules.iter().enumerate() {
        let (_, when) = parse_when(&rule.when, &format!("rules[{i}].when"))?;
        if first_match(&when, req, path).is_some() {
            return Ok(rule
                .decisions
                .iter()
                .filter(|(w, _)| *w > 0)
                .map(|(_, d)| d.clone())
                .collect());
        }
    }
    Ok(vec![table.otherwise.clone()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex(r: &str) -> Result<Matcher, String> {
        let m = StringMatch {
            regex: Some(r.to_string()),
            ..StringMatch::default()
        };
        Matcher::new(&m, "uri", false)
    }

    #[test]
    fn a_regex_matches_the_whole_value_with_re2s_ascii_classes() {
        let m = regex(r"/items/\d+").unwrap();
        assert!(m.matches("/items/42"));
        assert!(!m.matches("/items/42/x"), "whole value only");
        assert!(!m.matches("/items/٤٢"), "\\d is ASCII, as in RE2");
        let folded = Matcher::new(
            &StringMatch {
                regex: Some("/API/.*".into()),
                ..StringMatch::default()
            },
            "uri",
            true,
        )
        .unwrap();
        assert!(folded.matches("/api/v1"));
    }

    #[test]
    fn a_match_list_in_json_is_refused_naming_the_field() {
        let at = "services.reviews.plugins[0].match";
        let e = |v: serde_json::Value| parse_matches(&v, at).err().unwrap();
        assert_eq!(
            parse_matches(&serde_json::json!([{"uri": {"prefix": "/api"}}]), at)
                .unwrap()
                .len(),
            1
        );
        assert!(
            e(serde_json::json!([{}, {"uri": {"prefixx": "/"}}])).starts_with(
                "services.reviews.plugins[0].match[1].uri.prefixx: unknown field `prefixx`"
            ),
        );
        assert!(
            e(serde_json::json!([{"method": {"regex": "("}}]))
                .starts_with("services.reviews.plugins[0].match[0].method.regex: "),
        );
        assert!(e(serde_json::json!({"uri": {}})).starts_with(
            "services.reviews.plugins[0].match: invalid type: map, expected a sequence"
        ));
    }

    #[test]
    fn a_regex_the_engine_cannot_run_is_refused_naming_the_field() {
        let e = regex(r"\p{Greek}+")
            .err()
            .expect("unicode classes are refused");
        assert!(e.starts_with("uri.regex: "), "{e}");
        let e = regex("((a{100}){100}){100}")
            .err()
            .expect("over the size limit");
        assert!(e.starts_with("uri.regex: "), "{e}");
    }
}
