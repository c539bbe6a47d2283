//! A service starting from the configuration the operator injects: one call.
//!
//! ```text
//! FUSIONCACHE_CACHE_NAME=products FUSIONCACHE_BACKPLANE=redis FUSIONCACHE_REDIS_URL=redis://127.0.0.1:6379 \
//!     cargo run -p fusioncache --example injected_config
//! ```
//! Without any `FUSIONCACHE_*` variable it runs as a single in-memory node.

use fusioncache::FusionCache;

#[tokio::main]
async fn main() -> Result<(), fusioncache::Error> {
    let cache: FusionCache<String> = FusionCache::builder()
        .with_injected_config()
        .await?
        .build()?;
    println!(
        "cache {} on channel {}, backplane {:?}",
        cache.name(),
        cache.channel(),
        cache.backplane_state()
    );
    cache.set("hello", "world".into()).await?;
    println!("hello = {:?}", cache.get("hello").await);
    Ok(())
}
