//! `loadgen relay` (hidden): a plain TCP relay with mailguard's command line
//! (`--listen ADDR --upstream ADDR`).
//!
//! It exists so that `bench`'s child-process plumbing can be tested without mailguard (a
//! wrapper script passes its arguments on), and as an L4 reference point: what any proxy costs
//! before it inspects anything.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Relays every connection on `listen` to `upstream` until the process is killed.
pub fn run(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    let rt = crate::workers::current_thread()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}
