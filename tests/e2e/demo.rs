//! `wasmesh demo`: every step measured as expected, and nothing left
//! behind — no process the demo started (sidecars, their compilers, cargo
//! and rustc: whatever its process tree held, under any name), no socket
//! they listened on — whether it ends by itself or by Ctrl-C.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::WASMESH;

/// A process seen in the demo's tree: its name and start time (so a
/// recycled pid is not mistaken for it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    name: String,
    started: u64,
    cmdline: String,
}

/// `/proc/PID/stat` of a process not dead yet (a zombie is dead: it holds
/// nothing but its pid until its new parent reaps it): (name, parent, start
/// time).
fn stat(pid: u32) -> Option<(String, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split(' ').collect();
    // After the name: state(0) ppid(1) … starttime(19).
    if matches!(fields.first(), Some(&"Z" | &"X")) {
        return None;
    }
    Some((
        name,
        fields.get(1)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// The socket inodes `pid` holds.
fn sockets(pid: u32) -> BTreeSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Listening TCP sockets (IPv4 and IPv6): inode → port.
fn listening() -> BTreeMap<u64, u16> {
    let mut out = BTreeMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address(1) … st(3) … inode(9); 0A is LISTEN.
            if f.len() > 9 && f[3] == "0A" {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                if let (Some(port), Ok(inode)) = (port, f[9].parse()) {
                    out.insert(inode, port);
                }
            }
        }
    }
    out
}

/// What the demo's process tree held while it ran.
#[derive(Default)]
struct Tree {
    processes: BTreeMap<u32, Seen>,
    /// Listening sockets: inode → port.
    listeners: BTreeMap<u64, u16>,
}

impl Tree {
    /// Record the demo (`root`) and its descendants now.
    fn look(&mut self, root: u32) {
        let mut parents: BTreeMap<u32, u32> = BTreeMap::new();
        let mut info = BTreeMap::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((name, ppid, started)) = stat(pid) {
                parents.insert(pid, ppid);
                info.insert(pid, (name, started));
            }
        }
        let descends = |mut pid: u32| {
            for _ in 0..64 {
                if pid == root {
                    return true;
                }
                match parents.get(&pid) {
                    Some(&p) if p > 1 => pid = p,
                    _ => return false,
                }
            }
            false
        };
        let open = listening();
        for (pid, (name, started)) in info {
            if !descends(pid) {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            self.processes.entry(pid).or_insert(Seen {
                name,
                started,
                cmdline,
            });
            for inode in sockets(pid) {
                if let Some(&port) = open.get(&inode) {
                    self.listeners.insert(inode, port);
                }
            }
        }
    }

    /// Watch `child` until it exits (or `within` passes): its exit status.
    fn watch(&mut self, child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            self.look(child.id());
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Processes of the tree still alive, and listeners still open.
    fn left(&self) -> (Vec<String>, Vec<u16>) {
        let alive: Vec<String> = self
            .processes
            .iter()
            .filter(|(pid, seen)| {
                stat(**pid).is_some_and(|(_, _, started)| started == seen.started)
            })
            .map(|(pid, seen)| format!("{pid} {} ({})", seen.name, seen.cmdline))
            .collect();
        let open = listening();
        let ports: Vec<u16> = self
            .listeners
            .iter()
            .filter(|(inode, _)| open.contains_key(inode))
            .map(|(_, port)| *port)
            .collect();
        (alive, ports)
    }

    fn sidecars(&self) -> usize {
        self.processes
            .values()
            .filter(|s| s.cmdline.contains(" proxy --control "))
            .count()
    }
}

/// Start the demo with `args`; its output goes to files in `dir`. Plugin
/// builds share the guide's target directory and SDK copy.
fn start(dir: &Path, args: &[&str]) -> Child {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/plugin-new-test");
    Command::new(WASMESH)
        .arg("demo")
        .args(args)
        .env("CARGO_TARGET_DIR", &target)
        .env("XDG_DATA_HOME", target.join("data"))
        .env("TMPDIR", dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap()
}

fn output(dir: &Path) -> String {
    let mut s = String::new();
    for f in ["stdout", "stderr"] {
        let _ = std::fs::File::open(dir.join(f)).map(|mut f| f.read_to_string(&mut s));
    }
    s
}

fn assert_nothing_left(tree: &Tree, out: &str) {
    let (alive, ports) = tree.left();
    assert!(alive.is_empty(), "still running: {alive:#?}\n{out}");
    assert!(ports.is_empty(), "still listening: {ports:?}\n{out}");
    assert!(
        tree.sidecars() >= 7,
        "the test saw {} sidecar processes: {:#?}",
        tree.sidecars(),
        tree.processes
    );
    assert!(
        tree.listeners.len() >= 7 * 2 + 3,
        "the test saw too few listeners to mean anything: {:?}",
        tree.listeners
    );
}

#[test]
fn the_demo_runs_every_step_as_expected_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start(dir.path(), &["--non-interactive"]);
    let mut tree = Tree::default();
    let status = tree.watch(&mut child, Duration::from_secs(600));
    let out = output(dir.path());
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the demo ran for 10 minutes:\n{out}");
    };
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("all 11 steps as expected"), "{out}");
    assert_eq!(out.matches("━━ step ").count(), 11, "{out}");
    assert!(!out.contains('✘'), "{out}");
    // What each step measured, as it printed it (the demo checks these
    // itself; the test reads the exact figures it reports).
    for line in [
        "✔ expected every page from reviews v2: 100.0%",
        "✔ expected jason's pages without stars (ratings unavailable)",
        "✔ expected details → ratings denied (403) after it: 50× 403",
        "✔ expected no page failed across the swap (from the apply on): 0 of",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    assert_nothing_left(&tree, &out);
    // Its temporary directory is gone with it.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("wasmesh-demo-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn ctrl_c_stops_the_demo_and_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = start(dir.path(), &[]);
    let mut tree = Tree::default();
    // Until the mesh is up and the first step measures.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !output(dir.path()).contains("━━ step 1/") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            output(dir.path())
        );
        assert!(Instant::now() < deadline, "{}", output(dir.path()));
        tree.look(child.id());
        std::thread::sleep(Duration::from_millis(100));
    }
    tree.look(child.id());
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = tree.watch(&mut child, Duration::from_secs(60));
    let out = output(dir.path());
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{out}");
    assert!(
        out.contains("stopping the sidecars, control and the apps"),
        "{out}"
    );
    assert_nothing_left(&tree, &out);
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_app_serves_one_role_through_a_sidecar() {
    use crate::support::{Proxy, free_port, via};
    let port = |p: u16| format!("127.0.0.1:{p}");
    let (ratings, reviews) = (free_port(), free_port());
    // A standalone sidecar: `ratings` is the demo-app on `ratings`' port;
    // `reviews` v2 calls ratings through it.
    let proxy = Proxy::start(&format!(
        "services:\n  ratings:\n    endpoints: {{ v1: [\"{}\"] }}\n  reviews:\n    endpoints: {{ v2: [\"{}\"] }}\n",
        port(ratings),
        port(reviews)
    ))
    .await;
    let app = |role: &str, p: u16| {
        Command::new(WASMESH)
            .args(["demo-app", role, "--listen", &port(p)])
            .args(["--outbound", &proxy.listen.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut apps = [app("ratings", ratings), app("reviews-v2", reviews)];
    // The two apps start at once: reviews may answer before ratings
    // listens (its page then says ratings is unavailable), so wait for a
    // page with its ratings.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let r = via(&proxy, "reviews", "/reviews/0").await;
        let rated = r.status == 200 && r.json().get("stars").is_some();
        if rated || Instant::now() >= deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(page.status, 200, "{}", page.body_text());
    let j = page.json();
    assert_eq!(
        (
            j["version"].as_str(),
            j["color"].as_str(),
            j["stars"].as_u64()
        ),
        (Some("v2"), Some("black"), Some(5)),
        "{j}"
    );
    for a in &mut apps {
        let _ = a.kill();
        let _ = a.wait();
    }
}
