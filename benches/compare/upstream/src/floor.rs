//! The floor of the side-by-side benchmark (`benches/compare`): each client
//! connection gets its own connection to the upstream and its bytes are
//! copied both ways, nothing parsed, on one tokio current-thread runtime
//! (the scheduler `wasmesh proxy --workers 1` runs). No HTTP proxy on
//! tokio can add less latency a request than this does: the arm measures
//! how much of a proxy's added latency is the hop itself (the kernel's
//! loopback path and the wake-ups on the proxy's core) rather than its
//! HTTP work.
//!
//! `bench-floor 127.0.0.1:19106 127.0.0.1:19100`

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bench-floor LISTEN UPSTREAM");
        std::process::exit(2);
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(serve(listen, upstream))
}

async fn serve(listen: String, upstream: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("bench-floor listening on {listen}, copying to {upstream}");
    loop {
        let (mut client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let mut server = match TcpStream::connect(&upstream).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bench-floor: cannot reach {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
