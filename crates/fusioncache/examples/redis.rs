//! Two nodes sharing a Redis L2 and a Redis pub/sub backplane.
//!
//! `cargo run -p fusioncache --example redis -- redis://127.0.0.1:6379/0`

use std::time::Duration;

use fusioncache::backplane::redis::RedisBackplane;
use fusioncache::l2::redis::RedisDistributedCache;
use fusioncache::redis::RedisConnection;
use fusioncache::FusionCache;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
    let node = |url: &str| -> Result<FusionCache<String>, Box<dyn std::error::Error>> {
        // Each node has its own connection here, as separate processes would.
        let redis = RedisConnection::open(url)?;
        Ok(FusionCache::builder()
            .name("products")
            .distributed_cache(RedisDistributedCache::new(redis.clone()).key_prefix("example:"))
            .backplane(RedisBackplane::new(redis))
            .build()?)
    };
    let (a, b) = (node(&url)?, node(&url)?);
    for n in [&a, &b] {
        if !n.wait_for_backplane(Duration::from_secs(5)).await {
            return Err(format!("cannot subscribe on {url}").into());
        }
    }
    a.set("product:42", "v1".into()).await?;
    println!("b reads {:?} (from Redis)", b.get("product:42").await);
    a.set("product:42", "v2".into()).await?;
    while b.peek("product:42").as_deref() != Some("v2") {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!(
        "b now holds {:?} (notified, refreshed from Redis)",
        b.peek("product:42")
    );
    a.remove("product:42").await?;
    Ok(())
}
