//! `authz`: Istio AuthorizationPolicy as a wasmesh plugin, usually in a
//! service's `inbound-plugins` (the callee's side, as in Istio). One policy
//! spec, or `policies: [spec, ...]` combined as Istio combines the policies
//! of a workload: any matching DENY denies; then, if there are ALLOW
//! policies, a request none of them matches is denied; AUDIT only logs.
//! `dryRun: true` on a policy logs and counts what it would do instead.
//! See this crate's README for the schema.

use std::cell::OnceCell;
use std::net::IpAddr;

use serde::Deserialize;
use wasmesh_plugin_sdk::host;
use wasmesh_plugin_sdk::{
    Level, LocalReply, Plugin, Request, RequestDecision, RequestTable, TableRule, export,
    parse_config,
};

/// Several policies, combined as Istio combines a workload's policies. The
/// config is either this (`{ policies: [...] }`) or one [`Policy`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    /// The policies.
    pub policies: Vec<Policy>,
}

/// Istio `AuthorizationPolicy` spec (plus `dryRun`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// A name for logs.
    pub name: Option<String>,
    /// `ALLOW` (default), `DENY` or `AUDIT`.
    pub action: Option<String>,
    /// Rules, OR-ed.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Log and count instead of enforcing.
    #[serde(default)]
    pub dry_run: bool,
    /// Accepted for compatibility; the policy applies to the chain it is in.
    pub selector: Option<serde::de::IgnoredAny>,
}

/// Istio `Rule`: every given part must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources, OR-ed.
    #[serde(default)]
    pub from: Vec<From>,
    /// Operations, OR-ed.
    #[serde(default)]
    pub to: Vec<To>,
    /// Conditions, AND-ed.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `from[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The source.
    pub source: Source,
}

/// `to[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    /// The operation.
    pub operation: Operation,
}

/// Istio `Source`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (SPIFFE IDs without `spiffe://`, or with).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer address blocks (`10.0.0.0/8`, `127.0.0.1`).
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// The client address as the proxy sees it (same as ipBlocks here).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Istio `Operation`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Hosts (`Host` / `:authority`), case-insensitive.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths (without the query), with `*` prefix/suffix wildcards.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// Istio `Condition`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// `request.headers[NAME]`, `source.ip`, `remote.ip`, `source.namespace`,
    /// `source.principal`, `destination.port`.
    pub key: String,
    /// Values, OR-ed.
    #[serde(default)]
    pub values: Vec<String>,
    /// Negated values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Allow,
    Deny,
    Audit,
}

/// `exact`, `prefix*`, `*suffix` or `*`.
fn wildcard(pattern: &str, v: &str, fold: bool) -> bool {
    let eq = |a: &str, b: &str| {
        if fold {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return v.len() >= p.len() && v.is_char_boundary(p.len()) && eq(&v[..p.len()], p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return v.len() >= s.len()
            && v.is_char_boundary(v.len() - s.len())
            && eq(&v[v.len() - s.len()..], s);
    }
    eq(pattern, v)
}

/// An address block.
#[derive(Debug, Clone, Copy)]
struct Cidr {
    net: IpAddr,
    bits: u32,
}

impl Cidr {
    fn parse(s: &str, at: &str) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, b)) => (ip, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .parse()
            .map_err(|_| format!("{at}: {s:?} is not an address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .parse::<u32>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{at}: {s:?} has a bad prefix length"))?,
            None => max,
        };
        Ok(Self { net, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.bits)
                };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.bits)
                };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// What a request looks like to the rules; each part read once, on demand.
struct View<'a, 'r> {
    req: &'a Request<'r>,
    path: OnceCell<String>,
    method: OnceCell<String>,
    authority: OnceCell<String>,
    source: OnceCell<wasmesh_plugin_sdk::Peer>,
}

impl View<'_, '_> {
    fn path(&self) -> &str {
        self.path.get_or_init(|| {
            let mut p = self.req.path();
            if let Some(q) = p.find('?') {
                p.truncate(q);
            }
            p
        })
    }
    fn method(&self) -> &str {
        self.method.get_or_init(|| self.req.method())
    }
    fn authority(&self) -> &str {
        self.authority.get_or_init(|| {
            let a = self.req.authority();
            match a.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
                _ => a,
            }
        })
    }
    fn source(&self) -> &wasmesh_plugin_sdk::Peer {
        self.source.get_or_init(|| self.req.source())
    }
    fn ip(&self) -> Option<IpAddr> {
        let a = &self.source().address;
        a.parse::<std::net::SocketAddr>()
            .map(|s| s.ip())
            .ok()
            .or_else(|| a.parse().ok())
    }
    fn principal(&self) -> Option<&str> {
        self.source()
            .principal
            .as_deref()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
    }
}

struct CSource {
    principals: Vec<String>,
    not_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip: Vec<Cidr>,
    not_ip: Vec<Cidr>,
}

struct COperation {
    op: Operation,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

enum Key {
    Header(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

struct CCondition {
    key: Key,
    values: Vec<String>,
    not_values: Vec<String>,
    cidrs: Vec<Cidr>,
    not_cidrs: Vec<Cidr>,
}

struct CRule {
    from: Vec<CSource>,
    to: Vec<COperation>,
    when: Vec<CCondition>,
}

struct CPolicy {
    name: String,
    action: Action,
    dry_run: bool,
    rules: Vec<CRule>,
}

/// Any-of for a positive list (empty: no constraint) and none-of for a negative list.
fn list_ok(pos: &[String], neg: &[String], v: Option<&str>, fold: bool) -> bool {
    let any = |l: &[String]| v.is_some_and(|v| l.iter().any(|p| wildcard(p, v, fold)));
    (pos.is_empty() || any(pos)) && !any(neg)
}

/// Whether a rule leaves a field unset (no values, no negated values).
fn unset<T>(pos: &[T], neg: &[T]) -> bool {
    pos.is_empty() && neg.is_empty()
}

fn cidr_ok(pos: &[Cidr], neg: &[Cidr], ip: Option<IpAddr>) -> bool {
    let any = |l: &[Cidr]| ip.is_some_and(|ip| l.iter().any(|c| c.contains(ip)));
    (pos.is_empty() || any(pos)) && !any(neg)
}

impl CRule {
    fn matches(&self, v: &View<'_, '_>) -> bool {
        // A field the rule leaves unset is not read: each read is a host
        // call, and most rules name two or three fields of the ten.
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                (unset(&s.principals, &s.not_principals)
                    || list_ok(&s.principals, &s.not_principals, v.principal(), false))
                    && (unset(&s.namespaces, &s.not_namespaces)
                        || list_ok(
                            &s.namespaces,
                            &s.not_namespaces,
                            v.source().namespace.as_deref(),
                            false,
                        ))
                    && (unset(&s.ip, &s.not_ip) || cidr_ok(&s.ip, &s.not_ip, v.ip()))
            });
        if !from {
            return false;
        }
        let to = self.to.is_empty()
            || self.to.iter().any(|o| {
                (unset(&o.op.methods, &o.op.not_methods)
                    || list_ok(&o.op.methods, &o.op.not_methods, Some(v.method()), false))
                    && (unset(&o.op.paths, &o.op.not_paths)
                        || list_ok(&o.op.paths, &o.op.not_paths, Some(v.path()), false))
                    && (unset(&o.op.hosts, &o.op.not_hosts)
                        || list_ok(&o.op.hosts, &o.op.not_hosts, Some(v.authority()), true))
                    && (unset(&o.ports, &o.not_ports) || {
                        let port = v.req.port();
                        (o.ports.is_empty() || o.ports.contains(&port))
                            && !o.not_ports.contains(&port)
                    })
            });
        if !to {
            return false;
        }
        self.when.iter().all(|c| match &c.key {
            Key::SourceIp => cidr_ok(&c.cidrs, &c.not_cidrs, v.ip()),
            Key::Header(h) => list_ok(&c.values, &c.not_values, v.req.header(h).as_deref(), false),
            Key::SourceNamespace => list_ok(
                &c.values,
                &c.not_values,
                v.source().namespace.as_deref(),
                false,
            ),
            Key::SourcePrincipal => list_ok(&c.values, &c.not_values, v.principal(), false),
            Key::DestinationPort => list_ok(
                &c.values,
                &c.not_values,
                Some(&v.req.port().to_string()),
                false,
            ),
        })
    }
}

fn cidrs(l: &[String], at: &str) -> Result<Vec<Cidr>, String> {
    l.iter()
        .enumerate()
        .map(|(i, s)| Cidr::parse(s, &format!("{at}[{i}]")))
        .collect()
}

fn ports(l: &[String], at: &str) -> Result<Vec<u16>, String> {
    l.iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse()
                .map_err(|_| format!("{at}[{i}]: {p:?} is not a port"))
        })
        .collect()
}

fn compile(p: Policy, at: &str) -> Result<CPolicy, String> {
    let action = match p.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => {
            return Err(format!(
                "{at}.action: CUSTOM (external authorization) is not supported"
            ));
        }
        other => {
            return Err(format!(
                "{at}.action: {other:?} is not ALLOW, DENY or AUDIT"
            ));
        }
    };
    let mut rules = Vec::new();
    for (i, r) in p.rules.into_iter().enumerate() {
        let ra = format!("{at}.rules[{i}]");
        let mut from = Vec::new();
        for (j, f) in r.from.into_iter().enumerate() {
            let sa = format!("{ra}.from[{j}].source");
            let s = f.source;
            let strip = |l: Vec<String>| -> Vec<String> {
                l.into_iter()
                    .map(|p| p.strip_prefix("spiffe://").map(str::to_string).unwrap_or(p))
                    .collect()
            };
            let mut ip = cidrs(&s.ip_blocks, &format!("{sa}.ipBlocks"))?;
            ip.extend(cidrs(&s.remote_ip_blocks, &format!("{sa}.remoteIpBlocks"))?);
            let mut not_ip = cidrs(&s.not_ip_blocks, &format!("{sa}.notIpBlocks"))?;
            not_ip.extend(cidrs(
                &s.not_remote_ip_blocks,
                &format!("{sa}.notRemoteIpBlocks"),
            )?);
            from.push(CSource {
                principals: strip(s.principals),
                not_principals: strip(s.not_principals),
                namespaces: s.namespaces,
                not_namespaces: s.not_namespaces,
                ip,
                not_ip,
            });
        }
        let mut to = Vec::new();
        for (j, t) in r.to.into_iter().enumerate() {
            let oa = format!("{ra}.to[{j}].operation");
            to.push(COperation {
                ports: ports(&t.operation.ports, &format!("{oa}.ports"))?,
                not_ports: ports(&t.operation.not_ports, &format!("{oa}.notPorts"))?,
                op: t.operation,
            });
        }
        let mut when = Vec::new();
        for (j, c) in r.when.into_iter().enumerate() {
            let ca = format!("{ra}.when[{j}]");
            let key = if let Some(h) = c
                .key
                .strip_prefix("request.headers[")
                .and_then(|h| h.strip_suffix(']'))
            {
                Key::Header(h.to_ascii_lowercase())
            } else {
                match c.key.as_str() {
                    "source.ip" | "remote.ip" => Key::SourceIp,
                    "source.namespace" => Key::SourceNamespace,
                    "source.principal" => Key::SourcePrincipal,
                    "destination.port" => Key::DestinationPort,
                    k => {
                        return Err(format!(
                            "{ca}.key: {k:?} is not supported; use request.headers[NAME], source.ip, remote.ip, source.namespace, source.principal or destination.port"
                        ));
                    }
                }
            };
            let (cidrs_, not_cidrs) = if matches!(key, Key::SourceIp) {
                (
                    cidrs(&c.values, &format!("{ca}.values"))?,
                    cidrs(&c.not_values, &format!("{ca}.notValues"))?,
                )
            } else {
                (Vec::new(), Vec::new())
            };
            let values = c
                .values
                .iter()
                .map(|v| v.strip_prefix("spiffe://").unwrap_or(v).to_string())
                .collect();
            when.push(CCondition {
                key,
                values,
                not_values: c.not_values,
                cidrs: cidrs_,
                not_cidrs,
            });
        }
        rules.push(CRule { from, to, when });
    }
    Ok(CPolicy {
        name: p
            .name
            .unwrap_or_else(|| at.trim_start_matches("config.").to_string()),
        action,
        dry_run: p.dry_run,
        rules,
    })
}

/// The plugin.
pub struct Authz {
    policies: Vec<CPolicy>,
    has_allow: bool,
}

impl Plugin for Authz {
    /// One policy spec, or `{ policies: [spec, ...] }`: read as JSON first so
    /// that errors name the field in either shape.
    type Config = serde_json::Value;

    fn new(c: serde_json::Value) -> Result<Self, String> {
        let text = c.to_string();
        let policies = if c.get("policies").is_some() {
            parse_config::<Policies>(&text)?
                .policies
                .into_iter()
                .enumerate()
                .map(|(i, p)| compile(p, &format!("config.policies[{i}]")))
                .collect::<Result<_, _>>()?
        } else {
            vec![compile(parse_config::<Policy>(&text)?, "config")?]
        };
        let has_allow = policies
            .iter()
            .any(|p| p.action == Action::Allow && !p.dry_run);
        Ok(Self {
            policies,
            has_allow,
        })
    }

    /// Policies that name only methods, paths (exact, `prefix*`, `*`) and
    /// ports are a table the proxy evaluates itself: the DENY rules first
    /// (a denial counted in `denied` and logged at debug level, as the
    /// plugin would), then the ALLOW rules, then a denial for everything
    /// else when there are ALLOW policies. Sources, `when` conditions,
    /// hosts, negations, suffix paths, AUDIT and dry runs need the plugin.
    fn table_on_request(&self) -> Option<RequestTable> {
        if self
            .policies
            .iter()
            .any(|p| p.dry_run || p.action == Action::Audit)
        {
            return None;
        }
        let mut rules = Vec::new();
        for p in self.policies.iter().filter(|p| p.action == Action::Deny) {
            for (i, r) in p.rules.iter().enumerate() {
                if let Some(when) = r.scope()?.when() {
                    rules.push(
                        TableRule::when(when, deny())
                            .counting("denied")
                            .logging(format!(
                                "authz: denied {{method}} {{path}} from {{source}} by DENY {} rules[{i}]",
                                p.name
                            )),
                    );
                }
            }
        }
        if self.has_allow {
            for p in self.policies.iter().filter(|p| p.action == Action::Allow) {
                for r in &p.rules {
                    if let Some(when) = r.scope()?.when() {
                        rules.push(TableRule::when(when, RequestDecision::proceed()));
                    }
                }
            }
            rules.push(
                TableRule::always(deny()).counting("denied").logging(
                    "authz: denied {method} {path} from {source}: no ALLOW policy matched",
                ),
            );
        }
        Some(RequestTable {
            rules,
            otherwise: RequestDecision::proceed(),
        })
    }

    fn on_request(&self, req: &Request<'_>) -> Result<RequestDecision, String> {
        let v = View {
            req,
            path: OnceCell::new(),
            method: OnceCell::new(),
            authority: OnceCell::new(),
            source: OnceCell::new(),
        };
        let matching = |p: &CPolicy| p.rules.iter().position(|r| r.matches(&v));
        // AUDIT and dry-run policies only log and count. What a client can
        // make happen on every request (a denial, a dry-run denial) is
        // counted and logged at debug level, so a flood of bad requests is
        // not a flood of log lines; AUDIT logs at info, because logging is
        // what an operator asks of it (the host caps a plugin's info lines
        // per second).
        for p in &self.policies {
            if p.action == Action::Audit
                && let Some(i) = matching(p)
            {
                host::log(
                    Level::Info,
                    &format!(
                        "authz: AUDIT {} rules[{i}] matched {} {}",
                        p.name,
                        v.method(),
                        v.path()
                    ),
                );
                host::metric_add("audit", 1);
            }
        }
        for p in self.policies.iter().filter(|p| p.action == Action::Deny) {
            if let Some(i) = matching(p) {
                let what = format!("{} {} from {}", v.method(), v.path(), v.source().address);
                if p.dry_run {
                    host::log(
                        Level::Debug,
                        &format!("authz: dry run: would deny {what} by {} rules[{i}]", p.name),
                    );
                    host::metric_add("dry_run_denied", 1);
                    continue;
                }
                host::log(
                    Level::Debug,
                    &format!("authz: denied {what} by DENY {} rules[{i}]", p.name),
                );
                host::metric_add("denied", 1);
                return Ok(deny());
            }
        }
        let allows: Vec<&CPolicy> = self
            .policies
            .iter()
            .filter(|p| p.action == Action::Allow)
            .collect();
        if allows.is_empty() {
            return Ok(RequestDecision::proceed());
        }
        let enforced_match = allows.iter().any(|p| !p.dry_run && matching(p).is_some());
        for p in allows.iter().filter(|p| p.dry_run) {
            if matching(p).is_none() {
                host::log(
                    Level::Debug,
                    &format!(
                        "authz: dry run: {} would deny {} {} (no ALLOW rule matched)",
                        p.name,
                        v.method(),
                        v.path()
                    ),
                );
                host::metric_add("dry_run_denied", 1);
            }
        }
        if self.has_allow && !enforced_match {
            host::log(
                Level::Debug,
                &format!(
                    "authz: denied {} {} from {}: no ALLOW policy matched",
                    v.method(),
                    v.path(),
                    v.source().address
                ),
            );
            host::metric_add("denied", 1);
            return Ok(deny());
        }
        Ok(RequestDecision::proceed())
    }
}

/// The requests a policy's rules match, as Istio `HTTPMatchRequest`s.
enum Scope {
    /// None.
    Nothing,
    /// Every request.
    Everything,
    /// Those any of these match.
    Some(Vec<serde_json::Value>),
}

impl Scope {
    /// As a table rule's `when`; `None` for no request.
    fn when(self) -> Option<String> {
        match self {
            Scope::Nothing => None,
            Scope::Everything => Some(String::new()),
            Scope::Some(m) => Some(serde_json::Value::Array(m).to_string()),
        }
    }
}

/// At most this many `HTTPMatchRequest`s per rule in a table (methods ×
/// paths × ports of each operation); more, and the plugin decides.
const MAX_TABLE_MATCHES: usize = 64;

impl CRule {
    /// The requests it matches, when it names only methods, paths (exact,
    /// `prefix*`, `*`) and ports.
    fn scope(&self) -> Option<Scope> {
        let mut matches = Vec::new();
        if !self.from.is_empty() || !self.when.is_empty() {
            return None;
        }
        if self.to.is_empty() {
            return Some(Scope::Everything);
        }
        for o in &self.to {
            let op = &o.op;
            if !op.hosts.is_empty()
                || !op.not_hosts.is_empty()
                || !op.not_methods.is_empty()
                || !op.not_paths.is_empty()
                || !o.not_ports.is_empty()
            {
                return None;
            }
            let methods: Vec<Option<serde_json::Value>> = if op.methods.is_empty() {
                vec![None]
            } else {
                op.methods
                    .iter()
                    .map(|m| match m.as_str() {
                        "*" => Some(None),
                        m if m.contains('*') => None,
                        m => Some(Some(serde_json::json!({"exact": m}))),
                    })
                    .collect::<Option<_>>()?
            };
            let paths: Vec<Option<serde_json::Value>> = if op.paths.is_empty() {
                vec![None]
            } else {
                op.paths
                    .iter()
                    .map(|p| match p.as_str() {
                        "*" => Some(None),
                        p if p.starts_with('*') => None,
                        p => match p.strip_suffix('*') {
                            Some(prefix) if !prefix.contains('*') => {
                                Some(Some(serde_json::json!({"prefix": prefix})))
                            }
                            Some(_) => None,
                            None => Some(Some(serde_json::json!({"exact": p}))),
                        },
                    })
                    .collect::<Option<_>>()?
            };
            let ports: Vec<Option<u16>> = if o.ports.is_empty() {
                vec![None]
            } else {
                o.ports.iter().copied().map(Some).collect()
            };
            for m in &methods {
                for p in &paths {
                    for port in &ports {
                        if m.is_none() && p.is_none() && port.is_none() {
                            return Some(Scope::Everything);
                        }
                        let mut one = serde_json::Map::new();
                        if let Some(m) = m {
                            one.insert("method".into(), m.clone());
                        }
                        if let Some(p) = p {
                            one.insert("uri".into(), p.clone());
                        }
                        if let Some(port) = port {
                            one.insert("port".into(), (*port).into());
                        }
                        matches.push(serde_json::Value::Object(one));
                        if matches.len() > MAX_TABLE_MATCHES {
                            return None;
                        }
                    }
                }
            }
        }
        Some(if matches.is_empty() {
            Scope::Nothing
        } else {
            Scope::Some(matches)
        })
    }
}

fn deny() -> RequestDecision {
    RequestDecision::reply(LocalReply::text(403, "RBAC: access denied\n"))
}

export!(Authz, hooks: [on_request]);

#[cfg(test)]
mod tests;
