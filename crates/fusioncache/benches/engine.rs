//! Engine benchmarks, printed as a table with ratios against raw caches measured in the same run: raw
//! `moka::sync` (the baseline the project's goals are set against) and raw `quick_cache::sync` configured as
//! the L1 configures it (what the L1 wraps: SipHash keys, the default capacity).
//!
//! `cargo bench -p fusioncache --bench engine` (or `make bench-engine`). Each figure is the median over
//! 41 batches of the mean time per operation in the batch; p99 is over the same batch means. Batches of
//! the operation and of each baseline alternate, so that all see the same machine.

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

/// Measures `op` against each of `baselines`, alternating their batches so that all see the same machine
/// load. Returns (p50, p99) ns/op of `op` and, per baseline, the median of the per-batch ratios.
fn measure_against(
    baselines: &mut [&mut dyn FnMut()],
    op: &mut dyn FnMut(),
) -> ((f64, f64), Vec<f64>) {
    let mut per_batch = 1_000u64;
    while batch(per_batch, op) * (per_batch as f64) < 10e6 && per_batch < 50_000_000 {
        per_batch *= 4;
    }
    let mut means = Vec::with_capacity(BATCHES);
    let mut ratios = vec![Vec::with_capacity(BATCHES); baselines.len()];
    for _ in 0..BATCHES {
        let base: Vec<f64> = baselines.iter_mut().map(|b| batch(per_batch, *b)).collect();
        let m = batch(per_batch, op);
        means.push(m);
        for (r, b) in ratios.iter_mut().zip(base) {
            r.push(m / b);
        }
    }
    let ratios = ratios.iter_mut().map(|r| percentiles(r).0).collect();
    (percentiles(&mut means), ratios)
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
    let raw_qc: RawQuick<String> = raw_quick();
    raw_qc.insert(key.to_string(), value.clone());

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
    let raw_qc_arc: RawQuick<Arc<String>> = raw_quick();
    raw_qc_arc.insert(key.to_string(), shared.clone());
    // Many keys: each read takes the next of MANY_KEYS, so the entries are not all in the CPU's caches.
    let many: Vec<String> = (0..MANY_KEYS).map(|i| format!("product:{i:024}")).collect();
    let raw_many: moka::sync::Cache<String, String> =
        moka::sync::Cache::builder().max_capacity(100_000).build();
    let raw_qc_many: RawQuick<String> = raw_quick();
    let cache_many: FusionCache<String> = rt.block_on(async {
        let c = FusionCache::builder()
            .default_entry_options(EntryOptions::new().duration(Duration::from_secs(3600)))
            .build()
            .unwrap();
        for k in &many {
            c.set(k, value.clone()).await.unwrap();
            raw_many.insert(k.clone(), value.clone());
            raw_qc_many.insert(k.clone(), value.clone());
        }
        c
    });
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
            Some("raw-qc") => Box::new(|| {
                black_box(raw_qc.get(black_box(key)));
            }),
            Some("get") => Box::new(|| {
                black_box(poll_once(cache.get(black_box(key))).flatten());
            }),
            Some("get-tagged") => Box::new(|| {
                black_box(poll_once(cache.get(black_box(tagged_key))).flatten());
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
                eprintln!("--ops raw|raw-qc|get|get-tagged|peek|get-or-set|raw-arc|get-arc [N]");
                std::process::exit(2);
            }
        };
        for _ in 0..n {
            op();
        }
        return;
    }

    // Each row: the operation against raw moka get and raw quick_cache get (of the same value type).
    let mut rows: Vec<Row> = Vec::new();
    let mut raw_get = || {
        black_box(raw.get(black_box(key)));
    };
    let mut raw_qc_get = || {
        black_box(raw_qc.get(black_box(key)));
    };
    let mut against =
        |name, op: &mut dyn FnMut()| row(&mut rows, name, &mut [&mut raw_get, &mut raw_qc_get], op);
    against("raw moka get", &mut || {
        black_box(raw.get(black_box(key)));
    });
    against("raw quick_cache get (what the L1 wraps)", &mut || {
        black_box(raw_qc.get(black_box(key)));
    });
    against("FusionCache::get, L1 hit", &mut || {
        black_box(poll_once(cache.get(black_box(key))).flatten());
    });
    against("FusionCache::peek, L1 hit", &mut || {
        black_box(cache.peek(black_box(key)));
    });
    against("FusionCache::get, L1 hit, 2 tags", &mut || {
        black_box(poll_once(cache.get(black_box(tagged_key))).flatten());
    });
    against("FusionCache::get_or_set, L1 hit", &mut || {
        let v = poll_once(cache.get_or_set(black_box(key), || async {
            Ok::<_, std::io::Error>(String::new())
        }));
        black_box(v);
    });
    let (_, tagged_vs_untagged) = measure_against(
        &mut [&mut || {
            black_box(poll_once(cache.get(black_box(key))).flatten());
        }],
        &mut || {
            black_box(poll_once(cache.get(black_box(tagged_key))).flatten());
        },
    );

    let mut arc_rows: Vec<Row> = Vec::new();
    let mut raw_arc_get = || {
        black_box(raw_arc.get(black_box(key)));
    };
    let mut raw_qc_arc_get = || {
        black_box(raw_qc_arc.get(black_box(key)));
    };
    let mut against_arc = |name, op: &mut dyn FnMut()| {
        row(
            &mut arc_rows,
            name,
            &mut [&mut raw_arc_get, &mut raw_qc_arc_get],
            op,
        )
    };
    against_arc("raw moka get", &mut || {
        black_box(raw_arc.get(black_box(key)));
    });
    against_arc("raw quick_cache get", &mut || {
        black_box(raw_qc_arc.get(black_box(key)));
    });
    against_arc("FusionCache::get, L1 hit", &mut || {
        black_box(poll_once(cache_arc.get(black_box(key))).flatten());
    });

    let mut many_rows: Vec<Row> = Vec::new();
    let next = |i: &mut usize| {
        *i = (*i + 1) % MANY_KEYS;
        many[*i].as_str()
    };
    let (mut a, mut b, mut c, mut d, mut e) = (0, 0, 0, 0, 0);
    let mut raw_many_get = || {
        black_box(raw_many.get(next(&mut a)));
    };
    let mut raw_qc_many_get = || {
        black_box(raw_qc_many.get(next(&mut b)));
    };
    let mut against_many = |name, op: &mut dyn FnMut()| {
        row(
            &mut many_rows,
            name,
            &mut [&mut raw_many_get, &mut raw_qc_many_get],
            op,
        )
    };
    against_many("raw moka get", &mut || {
        black_box(raw_many.get(next(&mut c)));
    });
    against_many("raw quick_cache get", &mut || {
        black_box(raw_qc_many.get(next(&mut d)));
    });
    against_many("FusionCache::get, L1 hit", &mut || {
        black_box(poll_once(cache_many.get(next(&mut e))).flatten());
    });

    let mut codec_rows: Vec<(&str, (f64, f64))> = Vec::new();
    let mut nothing = || {};
    let source = uuid_like();
    let ts = now_ticks();
    let (encode, _) = measure_against(&mut [&mut nothing], &mut || {
        black_box(
            BackplaneMessage::new(black_box(&source), ts, Action::Set, black_box(key)).encode(),
        );
    });
    codec_rows.push(("message encode (32-byte key)", encode));
    let bytes = BackplaneMessage::new(&source, ts, Action::Set, key).encode();
    let (decode, _) = measure_against(&mut [&mut nothing], &mut || {
        black_box(BackplaneMessage::decode(black_box(&bytes)).ok());
    });
    codec_rows.push(("message decode (32-byte key)", decode));
    let (both, _) = measure_against(&mut [&mut nothing], &mut || {
        let b = BackplaneMessage::new(black_box(&source), ts, Action::Set, black_box(key)).encode();
        black_box(BackplaneMessage::decode(&b).map(|m| m.timestamp).ok());
    });
    codec_rows.push(("message encode + decode", both));

    for (title, rows) in [
        ("48-byte `String` values, one key", &rows),
        ("`Arc<String>` values, one key", &arc_rows),
        (
            &*format!("48-byte `String` values, {MANY_KEYS} keys read in turn") as &str,
            &many_rows,
        ),
    ] {
        println!();
        println!(
            "| {title} | p50 ns/op | p99 ns/op | ratio to raw moka get | ratio to raw quick_cache get |"
        );
        println!("|---|---:|---:|---:|---:|");
        for (name, (p50, p99), ratios) in rows.iter() {
            println!(
                "| {name} | {p50:.1} | {p99:.1} | {:.2}x | {:.2}x |",
                ratios[0], ratios[1]
            );
        }
    }
    println!();
    println!("| message codec | p50 ns/op | p99 ns/op |");
    println!("|---|---:|---:|");
    for (name, (p50, p99)) in codec_rows {
        println!("| {name} | {p50:.1} | {p99:.1} |");
    }
    println!();
    println!(
        "tagged hit (2 tags) / untagged hit: {:.2}x (goal <= 1.30x)",
        tagged_vs_untagged[0]
    );
    println!(
        "features: metrics {}",
        if cfg!(feature = "metrics") {
            "on (no recorder installed)"
        } else {
            "off"
        }
    );
    println!(
        "goals: get <= 1.15x raw moka get (String values); encode + decode < 200 ns. Rows of raw caches \
         show each baseline against the other (the first ratio of raw moka is 1.00x by construction)."
    );
}

/// One row of a table: an operation, its (p50, p99) ns/op, and its ratio to each baseline.
type Row<'a> = (&'a str, (f64, f64), Vec<f64>);

/// Measures `op` against `baselines` and adds it to `rows` as `name`.
fn row<'a>(
    rows: &mut Vec<Row<'a>>,
    name: &'a str,
    baselines: &mut [&mut dyn FnMut()],
    op: &mut dyn FnMut(),
) {
    let (stats, ratios) = measure_against(baselines, op);
    rows.push((name, stats, ratios));
}

/// The keys of the many-keys rows.
const MANY_KEYS: usize = 50_000;

/// A raw quick_cache configured as the L1 configures its store.
type RawQuick<V> = quick_cache::sync::Cache<
    String,
    V,
    quick_cache::UnitWeighter,
    std::collections::hash_map::RandomState,
>;

fn raw_quick<V: Clone>() -> RawQuick<V> {
    RawQuick::with(
        100_000,
        100_000,
        quick_cache::UnitWeighter,
        Default::default(),
        Default::default(),
    )
}

fn uuid_like() -> String {
    "0b5f8a3e-9c1d-4e7f-8a2b-3c4d5e6f7a8b".to_string()
}
