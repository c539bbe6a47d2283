//! A single node: `get_or_set` with a factory, fail-safe, timeouts, and events.
//!
//! `cargo run -p fusioncache --example basic`

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fusioncache::events::CacheEvent;
use fusioncache::{EntryOptions, FusionCache};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), fusioncache::Error> {
    let cache: FusionCache<String> = FusionCache::builder()
        .name("products")
        .default_entry_options(
            EntryOptions::new()
                .duration(Duration::from_millis(200))
                .fail_safe(true)
                .fail_safe_max_duration(Duration::from_secs(3600))
                .factory_soft_timeout(Duration::from_millis(50)),
        )
        .on_event(|e: &CacheEvent<'_>| {
            if let CacheEvent::StaleServed { key } = e {
                println!("  (event) served the fail-safe value of {key}");
            }
        })
        .build()?;

    let db_calls = Arc::new(AtomicU32::new(0));
    let load = |fail: bool| {
        let calls = db_calls.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if fail {
                Err(std::io::Error::other("database unavailable"))
            } else {
                Ok("Rust in Action".to_string())
            }
        }
    };

    let v = cache.get_or_set("product:42", load(false)).await?;
    println!("first read (factory ran): {v}");
    let v = cache.get_or_set("product:42", load(false)).await?;
    println!("second read (L1 hit):     {v}");

    tokio::time::sleep(Duration::from_millis(250)).await; // the entry is now logically expired
    let v = cache.get_or_set("product:42", load(true)).await?;
    println!("database down:            {v} (fail-safe)");

    println!(
        "factory runs: {}, stats: {:?}",
        db_calls.load(Ordering::SeqCst),
        cache.stats()
    );
    Ok(())
}
