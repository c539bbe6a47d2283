//! The `metrics` feature: counters reach an installed recorder under FusionCache's metric names, labelled
//! with the cache name. (`cargo test -p fusioncache --features metrics --test metrics`.)
#![cfg(feature = "metrics")]

use std::time::Duration;

use fusioncache::backplane::MemoryBackplane;
use fusioncache::FusionCache;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

#[tokio::test]
async fn a_hit_and_a_backplane_receive_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let bus = MemoryBackplane::new();
    let node = |name: &str| {
        FusionCache::<u32>::builder()
            .name(name)
            .backplane(bus.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (node("orders"), node("orders"));
    for n in [&a, &b] {
        assert!(n.wait_for_backplane(Duration::from_secs(5)).await);
    }
    a.set("k", 1).await.unwrap();
    assert_eq!(a.get("k").await, Some(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.stats().backplane_received == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // A snapshot resets the counters: take one.
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| key.kind() == MetricKind::Counter && key.key().name() == name)
            .filter(|(key, _, _, _)| {
                let have: Vec<(String, String)> = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect();
                labels
                    .iter()
                    .all(|(k, v)| have.contains(&(k.to_string(), v.to_string())))
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{other:?}"),
            })
            .sum()
    };
    let orders = ("fusioncache.cache.name", "orders");
    assert_eq!(
        counter(
            "fusioncache.cache.hit",
            &[orders, ("fusioncache.operation.level", "memory")]
        ),
        1
    );
    assert_eq!(counter("fusioncache.cache.set", &[orders]), 1);
    assert_eq!(counter("fusioncache.backplane.publish", &[orders]), 1);
    assert_eq!(counter("fusioncache.backplane.receive", &[orders]), 1);
    assert_eq!(
        counter(
            "fusioncache.cache.hit",
            &[("fusioncache.cache.name", "other")]
        ),
        0
    );
}
