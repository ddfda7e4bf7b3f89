//! Keeps one core from going idle, at the lowest priority there is: a
//! `SCHED_IDLE` thread that spins (`pause`) whenever nothing else wants the
//! core, and gives way the moment anything does (the scheduler preempts a
//! `SCHED_IDLE` task at once when a normal one wakes).
//!
//! On a virtual machine an idle core halts, and waking it again goes
//! through the host: on the machines these benchmarks run on, a median
//! request through two proxies waits about 28 µs on such wake-ups,
//! whichever proxies they are (benches/mtls/tail). That wait, the VM's
//! price of a wake-up, lands on every arm alike and hides what the
//! proxies themselves add;
//! with the cores kept awake (what `idle=poll` does on bare metal) the arms
//! differ by their own work. Used by `benches/mtls/run` ("cores awake").
//!
//! `taskset -c 0 bench-spin`

#[allow(unsafe_code)]
fn main() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets this process's own policy with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        eprintln!(
            "bench-spin: SCHED_IDLE: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
    loop {
        std::hint::spin_loop();
    }
}
