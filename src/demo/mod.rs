//! `wasmesh demo`: the whole mesh on one machine, in one command. Control
//! (embedded), bookinfo's apps ([`apps`]) with a sidecar process each
//! ([`mesh`]), mutual TLS between them, a traffic generator ([`traffic`]),
//! and scripted steps ([`steps`]) that each apply a change, wait until every
//! sidecar has it, measure what the users get, and check it against what
//! the step expects.

mod apps;
mod build;
mod mesh;
mod steps;
mod traffic;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt as _;

pub use mesh::exit_with_parent;

use self::mesh::Mesh;
use self::traffic::{Stats, Traffic};

/// `wasmesh demo`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Wait for Enter before each step.
    #[arg(long, conflicts_with = "non_interactive")]
    step: bool,
    /// Run every step and exit: 0 when each step's measured result matches
    /// its expectation, 1 otherwise.
    #[arg(long)]
    non_interactive: bool,
    /// Pages a second the traffic generator asks for.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(10..=2000))]
    rate: u32,
    /// How long each step measures.
    #[arg(long, default_value = "4s", value_parser = parse_window)]
    window: Duration,
}

/// `wasmesh demo-app`'s options: one of the demo's apps alone, for a
/// container beside a sidecar (deploy/kubernetes/demo).
#[derive(Clone, Debug, clap::Args)]
pub struct AppArgs {
    /// Which app.
    role: AppRole,
    /// Where it listens (not loadgen).
    #[arg(long, default_value = "0.0.0.0:9080")]
    listen: std::net::SocketAddr,
    /// Its sidecar's outbound listener, through which it calls the others.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: std::net::SocketAddr,
    /// loadgen: pages a second.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=2000))]
    rate: u32,
}

/// The demo's apps.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum AppRole {
    /// Calls details and reviews.
    Productpage,
    /// A book's details.
    Details,
    /// Reviews without stars.
    ReviewsV1,
    /// Reviews with black stars (calls ratings).
    ReviewsV2,
    /// Reviews with red stars (calls ratings).
    ReviewsV3,
    /// The stars.
    Ratings,
    /// The traffic generator: asks productpage for pages, prints a summary
    /// every 10 s.
    Loadgen,
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = wasmesh_api::parse_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(60) {
        return Err(format!("{s:?}: give a window from 1s to 60s"));
    }
    Ok(d)
}

/// One expectation of a step, and what was measured against it.
pub struct Check {
    /// What should hold, for a person.
    pub expected: String,
    /// What was measured.
    pub measured: String,
    /// It held.
    pub ok: bool,
}

impl Check {
    fn new(expected: impl Into<String>, measured: impl Into<String>, ok: bool) -> Check {
        Check {
            expected: expected.into(),
            measured: measured.into(),
            ok,
        }
    }
}

/// What the steps share: the mesh, its users, the plugin being built.
pub struct Ctx {
    mesh: Mesh,
    traffic: Option<Traffic>,
    window: Duration,
    build: Option<tokio::task::JoinHandle<anyhow::Result<Vec<build::Built>>>>,
    built: Option<Vec<build::Built>>,
    builder: build::Running,
    build_log: std::path::PathBuf,
}

impl Ctx {
    fn traffic(&self) -> &Traffic {
        self.traffic
            .as_ref()
            .expect("traffic runs once the mesh is up")
    }

    /// Print `yaml` as applied, apply it, wait until every sidecar has it.
    async fn apply(&self, what: &str, yaml: &str) -> anyhow::Result<()> {
        println!("  applied deploy/demo/{what}:");
        for line in yaml.trim_end().lines() {
            println!("    {line}");
        }
        let start = Instant::now();
        let revision = self
            .mesh
            .apply(&format!("deploy/demo/{what}"), yaml)
            .await?;
        let n = self.mesh.wait_rollout(Duration::from_secs(60)).await?;
        if n > 0 {
            let took = start.elapsed();
            println!(
                "  revision {revision}: all {n} sidecars serve it, {} after the apply{}",
                traffic::millis(took),
                if took > Duration::from_secs(1) {
                    " (a plugin new to the mesh was compiled, once: the sidecars share a compile cache)"
                } else {
                    ""
                }
            );
        } else {
            println!("  revision {revision}");
        }
        Ok(())
    }

    /// Measure the users' pages for one window, with a progress display
    /// at a terminal.
    async fn measure(&self) -> Stats {
        let start = Instant::now();
        let skipped = self.traffic().skipped();
        let bar = indicatif::ProgressBar::new(self.window.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("  measuring {bar:24.cyan/blue} {msg}")
                .expect("a valid template")
                .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        while start.elapsed() < self.window {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let s = Stats::of(&self.traffic().since(start));
            bar.set_position(start.elapsed().as_millis() as u64);
            bar.set_message(s.line());
        }
        bar.finish_and_clear();
        let end = Instant::now();
        self.traffic().settled(end).await;
        let samples: Vec<_> = self
            .traffic()
            .since(start)
            .into_iter()
            .filter(|s| s.sent < end)
            .collect();
        let s = Stats::of(&samples);
        let skipped = self.traffic().skipped() - skipped;
        if skipped > 0 {
            println!("  ({skipped} pages not asked for: too many in flight)");
        }
        println!(
            "  measured over {:.1} s: {}",
            (end - start).as_secs_f64(),
            s.line()
        );
        s
    }

    /// The custom plugin's builds, waiting for them.
    async fn built(&mut self) -> anyhow::Result<&[build::Built]> {
        if self.built.is_none() {
            let task = self.build.take().expect("the build started with the demo");
            if !task.is_finished() {
                println!(
                    "  waiting for cargo to finish building {} (its output: {})",
                    build::NAME,
                    self.build_log.display()
                );
            }
            self.built = Some(task.await??);
        }
        Ok(self.built.as_deref().unwrap_or_default())
    }
}

/// `wasmesh demo-app`.
pub fn app(args: AppArgs) -> ExitCode {
    let role = match args.role {
        AppRole::Productpage => Some(apps::Role::ProductPage),
        AppRole::Details => Some(apps::Role::Details),
        AppRole::ReviewsV1 => Some(apps::Role::Reviews(1)),
        AppRole::ReviewsV2 => Some(apps::Role::Reviews(2)),
        AppRole::ReviewsV3 => Some(apps::Role::Reviews(3)),
        AppRole::Ratings => Some(apps::Role::Ratings),
        AppRole::Loadgen => None,
    };
    let rt = match crate::multi_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let _running = match role {
            Some(role) => {
                let listener = match tokio::net::TcpListener::bind(args.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: cannot listen on {}: {e}", args.listen);
                        return ExitCode::from(1);
                    }
                };
                match apps::App::start(role, listener, args.outbound) {
                    Ok(app) => {
                        tracing::info!(service = role.service(), subset = role.subset(), addr = %app.addr, "serving");
                        Some(app)
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            None => None,
        };
        let traffic = role.is_none().then(|| Traffic::start(args.outbound, args.rate));
        let report = async {
            let Some(t) = &traffic else {
                return std::future::pending().await;
            };
            loop {
                let from = Instant::now();
                tokio::time::sleep(Duration::from_secs(10)).await;
                println!("{}", Stats::of(&t.since(from)).line());
            }
        };
        tokio::select! {
            () = report => {}
            () = interrupted() => {}
        }
        ExitCode::SUCCESS
    })
}

/// `wasmesh demo`.
pub fn run(args: DemoArgs) -> ExitCode {
    let rt = match crate::multi_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = rt.block_on(demo(args));
    // A `--step` prompt may still be reading standard input.
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn demo(args: DemoArgs) -> ExitCode {
    let dir = match tempfile::Builder::new().prefix("wasmesh-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot create a temporary directory: {e}");
            return ExitCode::from(1);
        }
    };
    let log = dir.path().join("control.log");
    match std::fs::File::create(&log) {
        Ok(f) => tracing_subscriber::fmt()
            .with_env_filter(crate::log_filter())
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .init(),
        Err(e) => {
            eprintln!("error: cannot create {}: {e}", log.display());
            return ExitCode::from(1);
        }
    }
    println!("wasmesh demo: a service mesh on this machine, bookinfo on it, and what it does");
    println!(
        "  its files (control's data, every log, the plugin's source) are in {}",
        dir.path().display()
    );
    let mesh = match Mesh::start_control(dir.path()).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot start control: {e:#}");
            return ExitCode::from(1);
        }
    };
    let builder = build::Running::default();
    let build_log = dir.path().join("cargo.log");
    let build = {
        let (src, log, running) = (dir.path().to_path_buf(), build_log.clone(), builder.clone());
        tokio::task::spawn_blocking(move || build::build_all(&src, &log, &running))
    };
    let mut ctx = Ctx {
        mesh,
        traffic: None,
        window: args.window,
        build: Some(build),
        built: None,
        builder,
        build_log,
    };
    let outcome = tokio::select! {
        r = scenario(&mut ctx, &args) => Some(r),
        () = interrupted() => None,
    };
    let outcome = match outcome {
        // The steps are done; the mesh keeps running for a person to look
        // around until Ctrl-C.
        Some(Ok(ok)) if !args.non_interactive => {
            steps::explore(&ctx);
            interrupted().await;
            Some(Ok(ok))
        }
        other => other,
    };
    println!("\nstopping the sidecars, control and the apps");
    ctx.traffic.take();
    ctx.builder.kill();
    ctx.mesh.shutdown().await;
    let code = match outcome {
        None => ExitCode::from(130),
        Some(Ok(true)) => ExitCode::SUCCESS,
        Some(Ok(false)) => ExitCode::from(1),
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    };
    if code != ExitCode::SUCCESS && keep(dir.path()) {
        println!("  logs kept in {}", dir.path().display());
        std::mem::forget(dir);
    }
    code
}

/// Keep a failed demo's directory for its logs (when it holds any).
fn keep(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Bring the mesh up, run the steps; whether every step held.
async fn scenario(ctx: &mut Ctx, args: &DemoArgs) -> anyhow::Result<bool> {
    steps::start_mesh(ctx, args.rate).await?;
    let all = steps::all();
    let mut failed = Vec::new();
    for (i, step) in all.iter().enumerate() {
        if args.step {
            println!(
                "\npress Enter for step {}/{}: {}",
                i + 1,
                all.len(),
                step.title
            );
            let mut line = String::new();
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
            if stdin.read_line(&mut line).await? == 0 {
                anyhow::bail!("standard input closed");
            }
        }
        println!("\n━━ step {}/{}: {}", i + 1, all.len(), step.title);
        println!("  {}", step.story);
        let checks = step.run(ctx).await?;
        for c in &checks {
            let mark = if c.ok { "✔" } else { "✘" };
            println!("  {mark} expected {}: {}", c.expected, c.measured);
        }
        if checks.iter().any(|c| !c.ok) {
            failed.push(i + 1);
        }
    }
    println!();
    if failed.is_empty() {
        println!("all {} steps as expected", all.len());
    } else {
        let list: Vec<String> = failed.iter().map(usize::to_string).collect();
        println!(
            "{} of {} steps did not go as expected: {}",
            failed.len(),
            all.len(),
            list.join(", ")
        );
    }
    Ok(failed.is_empty())
}
