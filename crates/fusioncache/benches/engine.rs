//! Engine benchmarks, printed as a table with ratios against raw moka measured in the same run.
//!
//! `cargo bench -p fusioncache --bench engine` (or `make bench-engine`). Each figure is the median over
//! 41 batches of the mean time per operation in the batch; p99 is over the same batch means.

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use fusioncache::backplane::{now_ticks, Action, BackplaneMessage};
use fusioncache::{EntryOptions, FusionCache};

const BATCHES: usize = 41;

/// Per-batch mean ns/op of `op`, with the batch size `per_batch`.
fn batch(per_batch: u64, op: &mut dyn FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..per_batch {
        op();
    }
    t.elapsed().as_nanos() as f64 / per_batch as f64
}

/// Measures `op` against `baseline`, alternating their batches so that both see the same machine load.
/// Returns (p50, p99) ns/op of `op` and the median of the per-pair ratios op/baseline.
fn measure_against(baseline: &mut dyn FnMut(), op: &mut dyn FnMut()) -> ((f64, f64), f64) {
    let mut per_batch = 1_000u64;
    while batch(per_batch, op) * (per_batch as f64) < 10e6 && per_batch < 50_000_000 {
        per_batch *= 4;
    }
    let mut means = Vec::with_capacity(BATCHES);
    let mut ratios = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let b = batch(per_batch, baseline);
        let m = batch(per_batch, op);
        means.push(m);
        ratios.push(m / b);
    }
    (percentiles(&mut means), percentiles(&mut ratios).0)
}

/// Polls `future` once, in place, with a no-op waker (an L1 hit is ready at its first poll), as an
/// executor polls a future it owns: inlined, so that the harness adds no call and no move of the future.
#[inline(always)]
fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[(v.len() * 99).div_ceil(100) - 1])
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing
    }
    let value = "a product description of some 48 bytes, cloned!".to_string();
    let key = "product:000000000000000000000042"; // 32 bytes
    assert_eq!(key.len(), 32);

    let raw: moka::sync::Cache<String, String> =
        moka::sync::Cache::builder().max_capacity(100_000).build();
    raw.insert(key.to_string(), value.clone());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tagged_key = "product:000000000000000000000043";
    let cache: FusionCache<String> = rt.block_on(async {
        let c = FusionCache::builder()
            .default_entry_options(EntryOptions::new().duration(Duration::from_secs(3600)))
            .build()
            .unwrap();
        c.set(key, value.clone()).await.unwrap();
        let tagged = c
            .default_entry_options()
            .clone()
            .tags(["category:7", "brand:3"]);
        c.set_with(tagged_key, value.clone(), &tagged)
            .await
            .unwrap();
        c
    });
    let shared = Arc::new(value.clone());
    let raw_arc: moka::sync::Cache<String, Arc<String>> =
        moka::sync::Cache::builder().max_capacity(100_000).build();
    raw_arc.insert(key.to_string(), shared.clone());
    let cache_arc: FusionCache<Arc<String>> = rt.block_on(async {
        let c = FusionCache::builder()
            .default_entry_options(EntryOptions::new().duration(Duration::from_secs(3600)))
            .build()
            .unwrap();
        c.set(key, shared.clone()).await.unwrap();
        c
    });
    let _guard = rt.enter();

    // `--ops NAME N`: only N operations of one kind, for an instruction count that does not depend on the
    // machine's noise, e.g. `valgrind --tool=callgrind <bench> --ops get 1000000` against `--ops raw …`.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--ops") {
        let n: u64 = args
            .get(i + 2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        let mut op: Box<dyn FnMut()> = match args.get(i + 1).map(String::as_str) {
            Some("raw") => Box::new(|| {
                black_box(raw.get(black_box(key)));
            }),
            Some("get") => Box::new(|| {
                black_box(poll_once(cache.get(black_box(key))).flatten());
            }),
            Some("peek") => Box::new(|| {
                black_box(cache.peek(black_box(key)));
            }),
            Some("get-or-set") => Box::new(|| {
                let v = poll_once(cache.get_or_set(black_box(key), || async {
                    Ok::<_, std::io::Error>(String::new())
                }));
                black_box(v);
            }),
            Some("raw-arc") => Box::new(|| {
                black_box(raw_arc.get(black_box(key)));
            }),
            Some("get-arc") => Box::new(|| {
                black_box(poll_once(cache_arc.get(black_box(key))).flatten());
            }),
            _ => {
                eprintln!("--ops raw|get|peek|get-or-set|raw-arc|get-arc [N]");
                std::process::exit(2);
            }
        };
        for _ in 0..n {
            op();
        }
        return;
    }

    let mut rows: Vec<(&str, (f64, f64), Option<f64>)> = Vec::new();
    let mut raw_get = || {
        black_box(raw.get(black_box(key)));
    };
    let (raw_alone, _) = measure_against(&mut raw_get, &mut || {
        black_box(raw.get(black_box(key)));
    });
    rows.push(("raw moka get (baseline)", raw_alone, Some(1.0)));
    let (get, ratio) = measure_against(&mut raw_get, &mut || {
        black_box(poll_once(cache.get(black_box(key))).flatten());
    });
    rows.push(("FusionCache::get, L1 hit", get, Some(ratio)));
    let (peek, ratio) = measure_against(&mut raw_get, &mut || {
        black_box(cache.peek(black_box(key)));
    });
    rows.push(("FusionCache::peek, L1 hit", peek, Some(ratio)));
    let (tagged, ratio) = measure_against(&mut raw_get, &mut || {
        black_box(poll_once(cache.get(black_box(tagged_key))).flatten());
    });
    rows.push(("FusionCache::get, L1 hit, 2 tags", tagged, Some(ratio)));
    let (_, tagged_vs_untagged) = measure_against(
        &mut || {
            black_box(poll_once(cache.get(black_box(key))).flatten());
        },
        &mut || {
            black_box(poll_once(cache.get(black_box(tagged_key))).flatten());
        },
    );
    let mut raw_arc_get = || {
        black_box(raw_arc.get(black_box(key)));
    };
    let (arc_raw, _) = measure_against(&mut raw_arc_get, &mut || {
        black_box(raw_arc.get(black_box(key)));
    });
    let (arc_get, arc_ratio) = measure_against(&mut raw_arc_get, &mut || {
        black_box(poll_once(cache_arc.get(black_box(key))).flatten());
    });
    let (get_or_set, ratio) = measure_against(&mut raw_get, &mut || {
        let v = poll_once(cache.get_or_set(black_box(key), || async {
            Ok::<_, std::io::Error>(String::new())
        }));
        black_box(v);
    });
    rows.push(("FusionCache::get_or_set, L1 hit", get_or_set, Some(ratio)));
    let mut nothing = || {};

    let source = uuid_like();
    let ts = now_ticks();
    let (encode, _) = measure_against(&mut nothing, &mut || {
        black_box(
            BackplaneMessage::new(black_box(&source), ts, Action::Set, black_box(key)).encode(),
        );
    });
    rows.push(("message encode (32-byte key)", encode, None));
    let bytes = BackplaneMessage::new(&source, ts, Action::Set, key).encode();
    let (decode, _) = measure_against(&mut nothing, &mut || {
        black_box(BackplaneMessage::decode(black_box(&bytes)).ok());
    });
    rows.push(("message decode (32-byte key)", decode, None));
    let (both, _) = measure_against(&mut nothing, &mut || {
        let b = BackplaneMessage::new(black_box(&source), ts, Action::Set, black_box(key)).encode();
        black_box(BackplaneMessage::decode(&b).map(|m| m.timestamp).ok());
    });
    rows.push(("message encode + decode", both, None));

    println!();
    println!("| operation | p50 ns/op | p99 ns/op | ratio to raw moka get |");
    println!("|---|---:|---:|---:|");
    for (name, (p50, p99), base) in rows {
        let ratio = base.map_or(String::new(), |r| format!("{r:.2}x"));
        println!("| {name} | {p50:.1} | {p99:.1} | {ratio} |");
    }
    println!();
    println!("| `Arc<String>` values | p50 ns/op | p99 ns/op | ratio to raw moka get |");
    println!("|---|---:|---:|---:|");
    println!(
        "| raw moka get (baseline) | {:.1} | {:.1} | 1.00x |",
        arc_raw.0, arc_raw.1
    );
    println!(
        "| FusionCache::get, L1 hit | {:.1} | {:.1} | {arc_ratio:.2}x |",
        arc_get.0, arc_get.1
    );
    println!();
    println!("tagged hit (2 tags) / untagged hit: {tagged_vs_untagged:.2}x (goal <= 1.30x)");
    println!(
        "features: metrics {}",
        if cfg!(feature = "metrics") {
            "on (no recorder installed)"
        } else {
            "off"
        }
    );
    println!("goals: get <= 1.15x raw moka get (String values); encode + decode < 200 ns.");
}

fn uuid_like() -> String {
    "0b5f8a3e-9c1d-4e7f-8a2b-3c4d5e6f7a8b".to_string()
}
