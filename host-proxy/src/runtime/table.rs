//! A plugin's `on-request-table` (contract 0.1.5): the rules its
//! `on-request` decides by, given once from `configure` and evaluated by
//! the host for each request instead of a call. The first rule whose
//! `when` (Istio `HTTPMatchRequest`s, the matcher of a chain entry's
//! `match`) holds gives one of its decisions, drawn by weight; `otherwise`
//! decides when none holds.

use std::sync::Arc;

use serde_json::{Value, json};
use wasmesh_plugin_sdk::{Request, RequestSource};

use super::PluginFailure;
use super::bindings::{wit, wit_host};
use super::convert;
use super::host::RequestView;
use super::types::{ReplyFlag, RequestDecision};
use crate::metrics::Decision;

/// A checked `on-request-table`.
pub struct RequestTable {
    rules: Vec<Rule>,
    otherwise: Arc<RequestDecision>,
    /// As the plugin gave it, for `/config`: each rule's `when`, its
    /// decisions (a reply's status, a route, or one word) and counter.
    pub json: Value,
}

struct Rule {
    when: Vec<wasmesh_istio::Condition>,
    /// Each decision with the running sum of the weights up to it.
    decisions: Vec<(u64, Arc<RequestDecision>)>,
    /// The sum of the weights (> 0).
    total: u64,
    count: Option<Box<str>>,
    log: Option<Box<str>>,
}

/// Too many rules for a table the host walks on every request.
const MAX_RULES: usize = 256;
/// Too many decisions in one rule.
const MAX_DECISIONS: usize = 256;

impl RequestTable {
    /// Check what the plugin gave (a reply flagged `flag`); an error names
    /// the rule and field (`rules[1].when[0].uri: ...`).
    pub(crate) fn new(
        rules: Vec<wit_host::RequestRule>,
        otherwise: wit::RequestDecision,
        flag: ReplyFlag,
    ) -> Result<Self, String> {
        if rules.len() > MAX_RULES {
            return Err(format!(
                "{} rules: at most {MAX_RULES}; give fewer, or decide in on-request",
                rules.len()
            ));
        }
        let decision = |d: wit::RequestDecision, at: &str| {
            convert::request_decision(d, flag).map_err(|f| match f {
                PluginFailure::Invalid(why) => format!("{at}: {why}"),
                f => format!("{at}: {f}"),
            })
        };
        let mut checked = Vec::with_capacity(rules.len());
        let mut shown = Vec::with_capacity(rules.len());
        for (i, r) in rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            let (when_json, when) = wasmesh_istio::parse_when(&r.when, &format!("{at}.when"))?;
            if r.decisions.is_empty() || r.decisions.len() > MAX_DECISIONS {
                return Err(format!(
                    "{at}.decisions: {} decisions; expected 1 to {MAX_DECISIONS}",
                    r.decisions.len()
                ));
            }
            let mut total = 0u64;
            let mut decisions = Vec::with_capacity(r.decisions.len());
            let mut shown_decisions = Vec::with_capacity(r.decisions.len());
            for (j, w) in r.decisions.into_iter().enumerate() {
                let d = decision(w.decision, &format!("{at}.decisions[{j}]"))?;
                total += u64::from(w.weight);
                shown_decisions.push(json!({"weight": w.weight, "decision": shown_decision(&d)}));
                decisions.push((total, Arc::new(d)));
            }
            if total == 0 {
                return Err(format!(
                    "{at}.decisions: every weight is 0; give one a weight above 0"
                ));
            }
            if let Some(c) = &r.count
                && !crate::metrics::valid_custom_name(c)
            {
                return Err(format!(
                    "{at}.count: {c:?}: expected 1 to 64 lowercase letters, digits or '_'"
                ));
            }
            if let Some(l) = &r.log
                && l.len() > super::host::LOG_CAP
            {
                return Err(format!(
                    "{at}.log: {} bytes; at most {}",
                    l.len(),
                    super::host::LOG_CAP
                ));
            }
            shown.push(json!({"when": when_json, "decisions": shown_decisions, "count": r.count}));
            checked.push(Rule {
                when,
                decisions,
                total,
                count: r.count.map(Into::into),
                log: r.log.map(Into::into),
            });
        }
        let otherwise = decision(otherwise, "otherwise")?;
        let json = json!({"rules": shown, "otherwise": shown_decision(&otherwise)});
        Ok(Self {
            rules: checked,
            otherwise: Arc::new(otherwise),
            json,
        })
    }

    /// The decision for `req`, and the counter and log line of the rule
    /// that gave it.
    pub fn decide(&self, req: &RequestView) -> Decided<'_> {
        let view = Request::native(req as &dyn RequestSource);
        let path = req.parts.uri.path();
        for rule in &self.rules {
            if wasmesh_istio::first_match(&rule.when, &view, path).is_none() {
                continue;
            }
            let d = match rule.decisions.as_slice() {
                [(_, only)] => only,
                many => {
                    let point = fastrand::u64(..rule.total);
                    many.iter()
                        .find(|(upto, _)| point < *upto)
                        .map_or(&many[many.len() - 1].1, |(_, d)| d)
                }
            };
            return Decided {
                decision: d,
                count: rule.count.as_deref(),
                log: rule.log.as_deref(),
            };
        }
        Decided {
            decision: &self.otherwise,
            count: None,
            log: None,
        }
    }
}

/// What a table decided for a request.
pub struct Decided<'a> {
    /// The decision.
    pub decision: &'a Arc<RequestDecision>,
    /// The plugin counter to add 1 to.
    pub count: Option<&'a str>,
    /// The line to log at debug level, its fields not yet filled in.
    pub log: Option<&'a str>,
}

/// A rule's log line for `req`: `{method}`, `{path}` (without the query)
/// and `{source}` filled in.
pub fn log_line(template: &str, req: &RequestView) -> String {
    template
        .replace("{method}", req.parts.method.as_str())
        .replace("{path}", req.parts.uri.path())
        .replace("{source}", &req.source_address)
}

/// A decision for `/config`: the reply's status, else where it routes,
/// else its word (as in the plugin's decision metrics).
fn shown_decision(d: &RequestDecision) -> Value {
    match (&d.reply, &d.route, &d.delay) {
        (Some(r), _, _) => json!({"reply": r.status.as_u16()}),
        (None, Some(r), _) => json!({"route": {"service": r.service, "subset": r.subset}}),
        (None, None, Some(_)) => json!(Decision::Delay.label()),
        (None, None, None) => json!(Decision::Proceed.label()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::runtime::types::Protocol;

    fn to(subset: &str) -> wit::RequestDecision {
        wit::RequestDecision {
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            route: Some(wit::Route {
                service: None,
                subset: Some(subset.into()),
                path: None,
                authority: None,
            }),
            timeout_ms: None,
            per_try_timeout_ms: None,
            delay_ms: None,
            reply: None,
        }
    }

    fn rule(when: &str, decisions: &[(u32, &str)]) -> wit_host::RequestRule {
        wit_host::RequestRule {
            when: when.into(),
            decisions: decisions
                .iter()
                .map(|(weight, s)| wit_host::WeightedDecision {
                    weight: *weight,
                    decision: to(s),
                })
                .collect(),
            count: None,
            log: None,
        }
    }

    fn table(rules: Vec<wit_host::RequestRule>) -> Result<RequestTable, String> {
        RequestTable::new(rules, to("none"), ReplyFlag::LocalReply)
    }

    fn view(path: &str, headers: &[(&str, &str)]) -> RequestView {
        let mut b = http::Request::get(path);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        RequestView {
            parts,
            scheme: "http",
            authority: None,
            port: 80,
            protocol: Protocol::Http1,
            source_address: Arc::from("127.0.0.1:1"),
            source_principal: None,
            service: Arc::from("reviews"),
            id: http::HeaderValue::from_static("id"),
            holds: Default::default(),
        }
    }

    fn subset(d: &RequestDecision) -> &str {
        d.route.as_ref().and_then(|r| r.subset.as_deref()).unwrap()
    }

    #[test]
    fn the_first_rule_that_holds_decides_and_weights_split() {
        let t = table(vec![
            rule(
                r#"[{"headers":{"end-user":{"exact":"jason"}}}]"#,
                &[(1, "v2")],
            ),
            rule(
                r#"[{"uri":{"prefix":"/api"}}]"#,
                &[(3, "v1"), (0, "v9"), (1, "v3")],
            ),
        ])
        .unwrap();
        let jason = view("/api/x?q=1", &[("end-user", "jason")]);
        assert_eq!(subset(t.decide(&jason).decision), "v2");
        assert_eq!(subset(t.decide(&view("/elsewhere", &[])).decision), "none");
        let api = view("/api/x?q=1", &[("end-user", "bob")]);
        let mut seen = std::collections::HashMap::<String, u32>::new();
        for _ in 0..4000 {
            *seen
                .entry(subset(t.decide(&api).decision).into())
                .or_default() += 1;
        }
        assert_eq!(seen.get("v9"), None, "a weight of 0 is never drawn");
        let v3 = f64::from(seen["v3"]) / 4000.0;
        assert!((0.2..0.3).contains(&v3), "v3 drawn {v3}, weight 1 of 4");
    }

    #[test]
    fn what_cannot_be_evaluated_is_refused_naming_the_rule() {
        let refused = |rules, want: &str| {
            let e = table(rules).err().expect("refused");
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        refused(
            vec![rule("[]", &[(1, "a")]), rule("{", &[(1, "a")])],
            "rules[1].when: not JSON",
        );
        refused(
            vec![rule(r#"[{"uri":{"prefix":"/"}},{"urii":{}}]"#, &[(1, "a")])],
            "rules[0].when[1].urii: unknown field `urii`",
        );
        refused(vec![rule("", &[])], "rules[0].decisions: 0 decisions");
        refused(
            vec![rule("", &[(0, "a"), (0, "b")])],
            "rules[0].decisions: every weight is 0",
        );
        let mut counted = rule("", &[(1, "a")]);
        counted.count = Some("Bad Name".into());
        refused(vec![counted], "rules[0].count: \"Bad Name\"");
        let mut bad = rule("", &[(1, "a")]);
        bad.decisions[0].decision.delay_ms = Some(3_600_000);
        refused(vec![bad], "rules[0].decisions[0]: ");
    }
}
