//! Memory caches and a backplane, no distributed cache: notifications are off by default, and the writes
//! that must reach the other nodes opt back in.
//!
//! `cargo run -p fusioncache --example no_l2`

use std::time::Duration;

use fusioncache::backplane::MemoryBackplane;
use fusioncache::{EntryOptions, FusionCache};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), fusioncache::Error> {
    let bus = MemoryBackplane::new();
    let quiet = EntryOptions::new().skip_backplane_notifications(true);
    let node = || {
        FusionCache::<u32>::builder()
            .name("stock")
            .default_entry_options(quiet.clone())
            .backplane(bus.clone())
            .build()
    };
    let (a, b) = (node()?, node()?);
    a.wait_for_backplane(Duration::from_secs(1)).await;
    b.wait_for_backplane(Duration::from_secs(1)).await;

    // Each node caches what it loaded itself; these sets tell nobody.
    a.set("sku:1", 10).await?;
    b.set("sku:1", 10).await?;

    // The stock changed: this write must invalidate the other nodes' copies.
    let notify = quiet.clone().skip_backplane_notifications(false);
    a.set_with("sku:1", 9, &notify).await?;
    while b.peek("sku:1").is_some() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!(
        "b dropped its copy; it reloads on next read: {:?}",
        b.get("sku:1").await
    );
    Ok(())
}
