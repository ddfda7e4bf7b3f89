//! The demo's script: bookinfo's lessons in Istio's vocabulary, each step a
//! change applied to control and a measurement of what the users got.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::Request;

use super::apps::Role;
use super::build;
use super::mesh::sum_by;
use super::traffic::{Stats, Traffic, pct};
use super::{Check, Ctx};

/// The steps' YAML: the files of deploy/demo, as `wasmesh apply -f` takes
/// them (on Kubernetes too, with deploy/kubernetes/demo).
macro_rules! demo_file {
    ($name:literal) => {
        ($name, include_str!(concat!("../../deploy/demo/", $name)))
    };
}
const BASE: (&str, &str) = demo_file!("00-services.yaml");
const CANARY: [(u8, (&str, &str)); 3] = [
    (10, demo_file!("01-canary-10.yaml")),
    (30, demo_file!("02-canary-30.yaml")),
    (100, demo_file!("03-canary-100.yaml")),
];
const ROLLBACK: (&str, &str) = demo_file!("04-rollback.yaml");
const FAULT: (&str, &str) = demo_file!("05-fault.yaml");
const ALL_VERSIONS: (&str, &str) = demo_file!("06-all-versions.yaml");
const RESILIENCE: (&str, &str) = demo_file!("07-resilience.yaml");
const AUTHZ: (&str, &str) = demo_file!("08-authz.yaml");
const GREETER: [(&str, &str); 2] = [
    demo_file!("09-greeter-1.0.0.yaml"),
    demo_file!("10-greeter-1.1.0.yaml"),
];

/// One step.
pub struct Step {
    /// Its title.
    pub title: &'static str,
    /// What it shows, in a sentence.
    pub story: &'static str,
    kind: Kind,
}

enum Kind {
    Mesh,
    Canary(u8),
    Rollback,
    Fault,
    BadRelease,
    Resilience,
    Authz,
    Plugin,
    Swap,
}

impl Step {
    /// Run it: what it expected and what it measured.
    pub async fn run(&self, ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
        match self.kind {
            Kind::Mesh => mesh(ctx).await,
            Kind::Canary(w) => canary(ctx, w).await,
            Kind::Rollback => rollback(ctx).await,
            Kind::Fault => fault(ctx).await,
            Kind::BadRelease => bad_release(ctx).await,
            Kind::Resilience => resilience(ctx).await,
            Kind::Authz => authz(ctx).await,
            Kind::Plugin => plugin(ctx).await,
            Kind::Swap => swap(ctx).await,
        }
    }
}

/// The script.
pub fn all() -> Vec<Step> {
    vec![
        Step {
            title: "the mesh",
            story: "Seven sidecars, one per app instance, each with a SPIFFE identity from control; every hop between them is mutual TLS.",
            kind: Kind::Mesh,
        },
        Step {
            title: "canary: 10% of reviews to v2",
            story: "A VirtualService-style weighted route, pushed to every sidecar; the users' pages show the split.",
            kind: Kind::Canary(10),
        },
        Step {
            title: "canary: 30% to v2",
            story: "v2 holds up: more of the traffic.",
            kind: Kind::Canary(30),
        },
        Step {
            title: "canary: 100% to v2",
            story: "The whole of it.",
            kind: Kind::Canary(100),
        },
        Step {
            title: "rollback to v1",
            story: "Second thoughts: one apply sends everyone back, and no page fails on the way.",
            kind: Kind::Rollback,
        },
        Step {
            title: "fault injection for one user",
            story: "ratings fails for jason alone (HTTPFaultInjection with a header match): his pages lose their stars, nobody else's do.",
            kind: Kind::Fault,
        },
        Step {
            title: "a bad release: reviews v3 answers 503",
            story: "All three versions of reviews serve, and v3 fails every request: without help, the users see it.",
            kind: Kind::BadRelease,
        },
        Step {
            title: "retries and a circuit breaker hide it",
            story: "builtin:retry tries another endpoint; builtin:circuit-breaker (outlierDetection) ejects v3.",
            kind: Kind::Resilience,
        },
        Step {
            title: "authorization: only reviews may call ratings",
            story: "An AuthorizationPolicy on ratings' inbound side, deciding on the caller's mTLS identity.",
            kind: Kind::Authz,
        },
        Step {
            title: "a custom plugin, built from source",
            story: "`wasmesh plugin new` made a greeter that counts each client's visits in shared state; cargo built it; it is pushed and put in front of productpage.",
            kind: Kind::Plugin,
        },
        Step {
            title: "its new version, swapped in live",
            story: "The greeter's source changed, was built again and pushed as 1.1.0; the swap happens under traffic.",
            kind: Kind::Swap,
        },
    ]
}

/// Start the sidecars and apps, apply the base config, start the traffic.
pub async fn start_mesh(ctx: &mut Ctx, rate: u32) -> anyhow::Result<()> {
    println!(
        "  control (embedded): gRPC {}, TLS {}",
        ctx.mesh.target.control, ctx.mesh.control_tls
    );
    ctx.apply(BASE.0, BASE.1).await?;
    let roles = [
        None,
        Some(Role::ProductPage),
        Some(Role::Details),
        Some(Role::Reviews(1)),
        Some(Role::Reviews(2)),
        Some(Role::Reviews(3)),
        Some(Role::Ratings),
    ];
    for role in roles {
        ctx.mesh.add(role).await?;
    }
    let start = Instant::now();
    println!(
        "  starting {} sidecars (sharing one compile cache: each plugin is compiled once)…",
        roles.len()
    );
    ctx.mesh.wait_ready(Duration::from_secs(180)).await?;
    ctx.mesh.wait_rollout(Duration::from_secs(60)).await?;
    println!(
        "  {} sidecars ready in {:.1} s:",
        roles.len(),
        start.elapsed().as_secs_f64()
    );
    for s in &ctx.mesh.sidecars {
        let app = ctx
            .mesh
            .apps
            .iter()
            .find(|a| a.role.service() == s.service && a.role.subset() == s.subset)
            .map_or("(the traffic generator)".to_string(), |a| {
                format!("app {}", a.addr)
            });
        println!(
            "    {:<12} {}  outbound {}  inbound {}  {app}",
            s.service,
            s.subset,
            s.listen,
            s.inbound.map_or("-".to_string(), |a| a.to_string())
        );
    }
    let ingress = ctx.mesh.sidecar("loadgen", "v1").listen;
    ctx.traffic = Some(Traffic::start(ingress, rate));
    println!(
        "  traffic: {rate} pages a second, GET /productpage through loadgen's sidecar, one in five as the user jason"
    );
    Ok(())
}

/// What a person can do with the mesh once the steps are done.
pub fn explore(ctx: &Ctx) {
    let exe = std::env::current_exe().map_or("wasmesh".to_string(), |p| p.display().to_string());
    let target = &ctx.mesh.target;
    let token = target
        .admin_token_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let loadgen = ctx.mesh.sidecar("loadgen", "v1");
    let page = ctx.mesh.sidecar("productpage", "v1");
    println!("\nThe mesh keeps running, with its traffic. From another terminal:");
    println!(
        "  curl -s -H 'host: productpage' -H 'end-user: jason' http://{}/productpage",
        loadgen.listen
    );
    println!(
        "  {exe} top --control {} --admin-token-file {token}",
        target.control
    );
    println!(
        "  {exe} get proxies --control {} --admin-token-file {token}",
        target.control
    );
    println!(
        "  curl -s http://{}/metrics | grep istio_requests_total",
        page.admin
    );
    println!("  sidecar logs: {}/*.log", ctx.mesh.dir.display());
    println!("Ctrl-C stops everything.");
}

/// The tolerance, in points, of a share `p` (0–1) measured over `n`
/// pages: four standard deviations of a binomial, at least 3 points.
fn tolerance(p: f64, n: usize) -> f64 {
    (4.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt() * 100.0).max(3.0)
}

fn no_failures(s: &Stats) -> Check {
    Check::new(
        "no failed page",
        format!("{} of {} failed", s.failed, s.requests),
        s.failed == 0 && s.requests > 0,
    )
}

fn only(s: &Stats, version: &str) -> Check {
    let share = s.version_pct(version);
    Check::new(
        format!("every page from reviews {version}"),
        format!("{share:.1}% of {} pages", s.served()),
        s.served() > 0 && s.versions.get(version).copied() == Some(s.served()),
    )
}

async fn mesh(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    let s = ctx.measure().await;
    let ids = ctx.mesh.identities().await?;
    let mut checks = vec![no_failures(&s), only(&s, "v1")];
    let wrong: Vec<String> = ids
        .iter()
        .filter(|(service, id)| *id != format!("spiffe://cluster.local/ns/default/sa/{service}"))
        .map(|(service, id)| format!("{service}: {id:?}"))
        .collect();
    checks.push(Check::new(
        "every sidecar to hold its service's identity, spiffe://cluster.local/ns/default/sa/SERVICE",
        if wrong.is_empty() {
            format!("{} of {} sidecars", ids.len(), ctx.mesh.sidecars.len())
        } else {
            format!("not so: {}", wrong.join(", "))
        },
        wrong.is_empty() && ids.len() == ctx.mesh.sidecars.len(),
    ));
    let by_policy = sum_by(
        &ctx.mesh.metrics().await,
        "istio_requests_total",
        &[("reporter", "destination")],
        "connection_security_policy",
    );
    let total: f64 = by_policy.values().sum();
    let mtls = by_policy.get("mutual_tls").copied().unwrap_or(0.0);
    checks.push(Check::new(
        "every request a sidecar received to be mutual TLS (istio_requests_total, reporter=destination)",
        format!("{mtls} of {total}"),
        total > 0.0 && mtls == total,
    ));
    Ok(checks)
}

async fn canary(ctx: &mut Ctx, weight: u8) -> anyhow::Result<Vec<Check>> {
    let (name, yaml) = CANARY
        .iter()
        .find(|(w, _)| *w == weight)
        .map(|(_, f)| *f)
        .expect("a canary weight the demo has a file for");
    ctx.apply(name, yaml).await?;
    let s = ctx.measure().await;
    if weight == 100 {
        return Ok(vec![no_failures(&s), only(&s, "v2")]);
    }
    let p = f64::from(weight) / 100.0;
    let tol = tolerance(p, s.served());
    let v2 = s.version_pct("v2");
    Ok(vec![
        no_failures(&s),
        Check::new(
            format!("{weight}% ± {tol:.1} of pages from reviews v2"),
            format!("{v2:.1}% of {} pages", s.served()),
            s.served() > 0 && (v2 - f64::from(weight)).abs() <= tol,
        ),
    ])
}

async fn rollback(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    let from = Instant::now();
    ctx.apply(ROLLBACK.0, ROLLBACK.1).await?;
    let s = ctx.measure().await;
    let during = Stats::of(&ctx.traffic().since(from));
    Ok(vec![
        Check::new(
            "no page failed from the apply on",
            format!("{} of {} failed", during.failed, during.requests),
            during.failed == 0,
        ),
        only(&s, "v1"),
    ])
}

async fn fault(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    ctx.apply(FAULT.0, FAULT.1).await?;
    let s = ctx.measure().await;
    let (j_ok, j_bad) = s.jason_stars;
    let (o_ok, o_bad) = s.others_stars;
    Ok(vec![
        no_failures(&s),
        Check::new(
            "jason's pages without stars (ratings unavailable)",
            format!("{} of {} pages", j_bad, j_ok + j_bad),
            j_bad > 0 && j_ok == 0,
        ),
        Check::new(
            "everyone else's pages with stars",
            format!("{} of {} pages", o_ok, o_ok + o_bad),
            o_ok > 0 && o_bad == 0,
        ),
    ])
}

async fn bad_release(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    ctx.mesh
        .app(Role::Reviews(3))
        .broken
        .store(true, Ordering::Relaxed);
    println!("  reviews v3 now answers 503 to everything");
    ctx.apply(ALL_VERSIONS.0, ALL_VERSIONS.1).await?;
    let s = ctx.measure().await;
    Ok(vec![Check::new(
        "users to see v3's failures (at least 10% of pages)",
        format!("{:.1}% of {} pages failed", s.failed_pct(), s.requests),
        s.failed_pct() >= 10.0,
    )])
}

async fn resilience(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    ctx.apply(RESILIENCE.0, RESILIENCE.1).await?;
    let s = ctx.measure().await;
    let metrics = ctx.mesh.metrics().await;
    let custom = |name: &str| {
        sum_by(
            &metrics,
            "wasmesh_plugin_custom_total",
            &[("service", "reviews"), ("name", name)],
            "name",
        )
        .values()
        .sum::<f64>()
    };
    let (ejections, retries) = (custom("ejections"), custom("retries"));
    let v3 = ctx.mesh.app(Role::Reviews(3));
    v3.broken.store(false, Ordering::Relaxed);
    println!(
        "  (reviews v3 is fixed now; productpage's sidecar keeps it ejected for its 60 s ejection time)"
    );
    Ok(vec![
        no_failures(&s),
        Check::new(
            "v3 ejected by productpage's sidecar",
            format!("{ejections} ejection(s), {retries} retries"),
            ejections >= 1.0,
        ),
    ])
}

/// `n` requests from details' sidecar to ratings: statuses and counts.
async fn details_to_ratings(ctx: &Ctx, n: usize) -> std::collections::BTreeMap<u16, usize> {
    let details = ctx.mesh.sidecar("details", "v1").listen;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let req = Request::get(format!("http://{details}/ratings/0"))
            .header("host", "ratings")
            .body(Full::default())
            .expect("a valid request");
        let status = ctx.mesh.send(req).await.map_or(0, |(s, _)| s);
        *seen.entry(status).or_default() += 1;
    }
    seen
}

fn statuses(seen: &std::collections::BTreeMap<u16, usize>) -> String {
    seen.iter()
        .map(|(s, n)| format!("{n}× {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn authz(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    let before = details_to_ratings(ctx, 20).await;
    println!(
        "  before: details → ratings (sent through details' sidecar): {}",
        statuses(&before)
    );
    ctx.apply(AUTHZ.0, AUTHZ.1).await?;
    let after = details_to_ratings(ctx, 50).await;
    println!("  after: details → ratings: {}", statuses(&after));
    let s = ctx.measure().await;
    let (ok, bad) = (
        s.jason_stars.0 + s.others_stars.0,
        s.jason_stars.1 + s.others_stars.1,
    );
    Ok(vec![
        Check::new(
            "details → ratings allowed before the policy",
            statuses(&before),
            before.get(&200) == Some(&20),
        ),
        Check::new(
            "details → ratings denied (403) after it",
            statuses(&after),
            after.get(&403) == Some(&50),
        ),
        no_failures(&s),
        Check::new(
            "reviews → ratings still allowed: every page with stars",
            format!("{ok} of {} pages", ok + bad),
            ok > 0 && bad == 0,
        ),
    ])
}

async fn push(ctx: &mut Ctx, index: usize) -> anyhow::Result<&'static str> {
    let built = ctx.built().await?[index].clone();
    let mut c = ctx.mesh.clients().await?;
    let p = crate::control_cmd::push_bytes(&mut c, built.bytes.clone(), build::NAME, built.version)
        .await
        .map_err(|f| anyhow::anyhow!("pushing {}: {}", build::NAME, f.message()))?;
    println!(
        "  built {}@{} with cargo in {:.1} s ({} KiB); pushed, sha256 {}",
        build::NAME,
        built.version,
        built.took.as_secs_f64(),
        built.bytes.len() / 1024,
        &p.sha256[..16]
    );
    Ok(built.version)
}

fn greeted(s: &Stats, version: &str) -> Check {
    let n = s.greeter.get(version).copied().unwrap_or(0);
    Check::new(
        format!("every page to carry x-greeter-version: {version}"),
        format!("{n} of {} pages", s.served()),
        n > 0 && n == s.served(),
    )
}

async fn plugin(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    let version = push(ctx, 0).await?;
    ctx.apply(GREETER[0].0, GREETER[0].1).await?;
    let s = ctx.measure().await;
    Ok(vec![no_failures(&s), greeted(&s, version)])
}

async fn swap(ctx: &mut Ctx) -> anyhow::Result<Vec<Check>> {
    let [old, new] = build::VERSIONS;
    println!("  the change, in src/lib.rs:");
    println!("    -            .set_response_header(\"x-greeter-version\", \"{old}\"))");
    println!("    +            .set_response_header(\"x-greeter-version\", \"{new}\"))");
    let version = push(ctx, 1).await?;
    let from = Instant::now();
    ctx.apply(GREETER[1].0, GREETER[1].1).await?;
    let s = ctx.measure().await;
    let during = ctx.traffic().since(from);
    let failed = during.iter().filter(|x| x.failed()).count();
    let visits = |v: &str| {
        let all = ctx.traffic().since(from - Duration::from_secs(60));
        let counts: Vec<u64> = all
            .iter()
            .filter(|x| x.greeter_version.as_deref() == Some(v))
            .filter_map(|x| x.visits)
            .collect();
        (counts.iter().max().copied(), counts.iter().min().copied())
    };
    let (old_max, _) = visits(old);
    let (_, new_min) = visits(new);
    Ok(vec![
        Check::new(
            "no page failed across the swap (from the apply on)",
            format!(
                "{failed} of {} failed ({:.1}%)",
                during.len(),
                pct(failed, during.len())
            ),
            failed == 0 && !during.is_empty(),
        ),
        greeted(&s, version),
        Check::new(
            format!(
                "the visit count to carry on from {old} to {new} (shared state outlives the swap)"
            ),
            format!(
                "{old} counted up to {}, {new} started at {}",
                old_max.map_or("-".into(), |v| v.to_string()),
                new_min.map_or("-".into(), |v| v.to_string())
            ),
            matches!((old_max, new_min), (Some(a), Some(b)) if b > a),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_parses_and_the_greeter_files_name_the_versions_built() {
        let mut files = vec![BASE, ROLLBACK, FAULT, ALL_VERSIONS, RESILIENCE, AUTHZ];
        files.extend(CANARY.iter().map(|(_, f)| *f));
        files.extend(GREETER);
        for (name, yaml) in files {
            wasmesh_api::resources::parse_documents(yaml)
                .unwrap_or_else(|e| panic!("deploy/demo/{name}: {e:?}"));
        }
        for (file, version) in GREETER.iter().zip(build::VERSIONS) {
            assert!(
                file.1
                    .contains(&format!("source: {}@{version}", build::NAME)),
                "{}",
                file.0
            );
        }
    }
}
