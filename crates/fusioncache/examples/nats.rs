//! Two nodes told of changes over NATS, sharing a Redis L2 when a Redis URL is given.
//!
//! `cargo run -p fusioncache --example nats -- nats://127.0.0.1:4222 [redis://127.0.0.1:6379]`

use std::sync::Arc;
use std::time::Duration;

use fusioncache::backplane::nats::{NatsBackplane, NatsOptions};
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::FusionCache;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nats_url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let redis_url = std::env::args().nth(2);
    // One NATS connection shared by every cache of the process.
    let backplane =
        Arc::new(NatsBackplane::connect_with(NatsOptions::new(&nats_url).name("example")).await?);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut builder = FusionCache::<String>::builder()
            .name("orders")
            .shared_backplane(backplane.clone());
        if let Some(url) = &redis_url {
            builder =
                builder.distributed_cache(RedisDistributedCache::new(RedisConnection::open(url)?));
        }
        let node = builder.build()?;
        if !node.wait_for_backplane(Duration::from_secs(5)).await {
            return Err(format!("cannot subscribe on {nats_url}").into());
        }
        nodes.push(node);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    b.set("order:1", "pending".into()).await?;
    a.set("order:1", "paid".into()).await?;
    while b.peek("order:1").as_deref() == Some("pending") {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("b no longer serves the old value: {:?}", b.peek("order:1"));
    Ok(())
}
