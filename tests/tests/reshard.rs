//! Reading a checkpoint under another layout (`load_rows`, `RowReader`) and averaging checkpoints, against a
//! real ckptd. Chunks are deliberately smaller than a row and not aligned to rows, so ranges
//! cut through chunks.

use bytes::Bytes;
use ckpt_client::{Client, ClientOptions, DType, Tensor};
use ckpt_tests::{bounded, save_step, seed, start_daemon};
use rand::{Rng, SeedableRng};
use std::time::Duration;

const COLS: u64 = 3;

/// Rank slices of a `[rows, COLS]` f32 tensor whose element at (r, c) is `base + r * COLS + c`;
/// `cuts` are the first rows of ranks 1.. .
fn row_slices(name: &str, rows: u64, cuts: &[u64], base: f32) -> Vec<Vec<Tensor>> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(rows);
    bounds
        .windows(2)
        .map(|w| {
            let data: Vec<u8> = (w[0] * COLS..w[1] * COLS).flat_map(|i| (base + i as f32).to_le_bytes()).collect();
            vec![Tensor {
                name: name.into(),
                dtype: DType::F32,
                shape: vec![w[1] - w[0], COLS],
                global_shape: vec![rows, COLS],
                offsets: vec![w[0], 0],
                data: Bytes::from(data),
            }]
        })
        .collect()
}

/// 20-byte chunks over HTTP: smaller than most rows and boxes and aligned to none, so reads cut
/// through chunks.
fn tiny_chunks() -> ClientOptions {
    ClientOptions { chunk_bytes: 20, node_local: false, ..Default::default() }
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_row_range_reads_back_from_any_layout() {
    let s = seed(7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    // 20-byte chunks: rows are 12 bytes, so chunks straddle rows.
    let client = Client::new(&d.url(), tiny_chunks()).unwrap();
    let rows = 17;
    bounded(Duration::from_secs(60), save_step(&client, "rows", 1, &row_slices("w", rows, &[5, 6, 12], 0.0)))
        .await
        .unwrap();
    let m = client.checkpoint("rows", 1).await.unwrap();
    for _ in 0..40 {
        let start = rng.random_range(0..rows);
        let n = rng.random_range(0..=rows - start);
        let (bytes, shape) = client.load_rows(&m, "w", start, n).await.unwrap();
        let want: Vec<f32> = (start * COLS..(start + n) * COLS).map(|i| i as f32).collect();
        assert_eq!(floats(&bytes), want, "seed {s}: rows {start}+{n}");
        assert_eq!(shape, vec![rows, COLS]);
    }
    let err = client.load_rows(&m, "w", 10, 8).await.unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    let err = client.load_rows(&m, "nope", 0, 1).await.unwrap_err();
    assert!(err.to_string().contains("not in rows@1"), "{err}");
}

/// A tensor cut into a 2 x 3 grid of boxes (rows 0..7 and 7..20, columns 0..2, 2..5 and 5..9),
/// with a replica of every box on a second group of ranks, read back in blocks of rows of
/// random sizes through one `RowReader`: each block must be the global rows, whichever boxes
/// and chunks it cuts through. Element (r, c) is r * 100 + c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_reader_streams_a_grid_layout_in_blocks_of_any_size() {
    let s = seed(11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    // 20-byte chunks: no box row (8 to 16 bytes) lines up with them.
    let client = Client::new(&d.url(), tiny_chunks()).unwrap();
    let (rows, cols) = (20u64, 9u64);
    let value = |r: u64, c: u64| (r * 100 + c) as f32;
    let row_cuts = [0u64, 7, 20];
    let col_cuts = [0u64, 2, 5, 9];
    let mut ranks = Vec::new();
    for _replica in 0..2 {
        for rw in row_cuts.windows(2) {
            for cw in col_cuts.windows(2) {
                let data: Vec<u8> =
                    (rw[0]..rw[1]).flat_map(|r| (cw[0]..cw[1]).flat_map(move |c| value(r, c).to_le_bytes())).collect();
                ranks.push(vec![
                    Tensor {
                        name: "grid".into(),
                        dtype: DType::F32,
                        shape: vec![rw[1] - rw[0], cw[1] - cw[0]],
                        global_shape: vec![rows, cols],
                        offsets: vec![rw[0], cw[0]],
                        data: Bytes::from(data),
                    },
                    Tensor::whole("count", DType::I64, vec![], Bytes::copy_from_slice(&41i64.to_le_bytes())),
                ]);
            }
        }
    }
    bounded(Duration::from_secs(60), save_step(&client, "grid", 1, &ranks)).await.unwrap();
    let cp = client.checkpoint("grid", 1).await.unwrap();
    for _ in 0..8 {
        let start = rng.random_range(0..rows);
        let end = rng.random_range(start..=rows);
        let reader = client.row_reader(&cp, "grid", start..end).await.unwrap();
        assert_eq!((reader.global_shape(), reader.row_bytes()), (&[rows, cols][..], cols * 4));
        let mut at = start;
        while at < end {
            let n = rng.random_range(1..=end - at);
            let mut out = vec![0u8; reader.bytes_of(n).unwrap()];
            reader.read_rows(at, n, &mut out).await.unwrap();
            let want: Vec<f32> = (at..at + n).flat_map(|r| (0..cols).map(move |c| value(r, c))).collect();
            assert_eq!(floats(&out), want, "seed {s}: rows {at}+{n} of a reader on {start}..{end}");
            at += n;
        }
        // Only the rows it was opened for: the boxes it fetched may not cover the others.
        if end < rows {
            let mut out = vec![0u8; reader.bytes_of(1).unwrap()];
            let err = reader.read_rows(end, 1, &mut out).await.unwrap_err();
            assert!(err.to_string().contains("opened for"), "seed {s}: {err}");
        }
    }
    // A scalar is one row; reading none of it reads nothing.
    let scalar = client.row_reader(&cp, "count", 0..1).await.unwrap();
    scalar.read_rows(0, 0, &mut []).await.unwrap();
    let mut one = [0u8; 8];
    scalar.read_rows(0, 1, &mut one).await.unwrap();
    assert_eq!(i64::from_le_bytes(one), 41);
    // load_rows goes through the same reader.
    let (bytes, shape) = client.load_rows(&cp, "grid", 3, 10).await.unwrap();
    assert_eq!(shape, vec![rows, cols]);
    assert_eq!(floats(&bytes), (3..13).flat_map(|r| (0..cols).map(move |c| value(r, c))).collect::<Vec<_>>());
}

/// A reader of many tensors fetches each rank's index object once: with the index objects
/// gone from the store after the first tensor was read, the second still reads through the
/// client's cache, and a client without one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_objects_are_fetched_once_per_client_not_once_per_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let opts = tiny_chunks();
    let cached = Client::new(&d.url(), opts.clone()).unwrap();
    let uncached = Client::new(&d.url(), ClientOptions { index_cache_bytes: 0, ..opts }).unwrap();
    let mut ranks = row_slices("a", 12, &[4, 8], 0.0);
    for (r, b) in ranks.iter_mut().zip(row_slices("b", 12, &[4, 8], 100.0)) {
        r.extend(b);
    }
    bounded(Duration::from_secs(60), save_step(&cached, "twice", 1, &ranks)).await.unwrap();
    let cp = cached.checkpoint("twice", 1).await.unwrap();
    let world = u64::from(cp.world_size());
    cached.load_rows(&cp, "a", 0, 12).await.unwrap();
    // Counted: one fetch per rank, not per tensor; and without a cache, per tensor.
    let counted = cached.index_objects_fetched();
    for _ in 0..2 {
        uncached.load_rows(&cp, "a", 0, 12).await.unwrap();
    }
    assert_eq!((counted, uncached.index_objects_fetched()), (world, 2 * world));
    let indexes = dir.path().join("store").join(ckpt_core::keys::indexes_prefix("twice"));
    std::fs::remove_dir_all(&indexes).unwrap();
    let (bytes, _) = cached.load_rows(&cp, "b", 0, 12).await.expect("b read with the indexes a's read cached");
    assert_eq!(cached.index_objects_fetched(), world);
    assert_eq!(floats(&bytes), (0..12 * COLS).map(|i| 100.0 + i as f32).collect::<Vec<_>>());
    assert!(uncached.load_rows(&cp, "b", 0, 12).await.is_err(), "without a cache the indexes are fetched again");
    // What vouches for the stored bytes never answers from the cache.
    assert!(cached.manifest("twice", 1).await.is_err(), "manifest answered from the cache");
    assert!(cached.verify("twice", 1, |_| {}).await.is_err(), "verify answered from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layouts_with_gaps_are_refused_not_filled() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let client = Client::new(&d.url(), ClientOptions { node_local: false, ..Default::default() }).unwrap();
    let mut ranks = row_slices("w", 9, &[4], 0.0);
    // Rank 1 claims rows 5.. of 9 but holds only 4 rows: row 4 is nobody's.
    ranks[1][0].offsets = vec![5, 0];
    ranks[1][0].global_shape = vec![9, COLS];
    ranks[1][0].shape = vec![4, COLS];
    ranks[1][0].data = ranks[1][0].data.slice(..(4 * COLS * 4) as usize);
    bounded(Duration::from_secs(60), save_step(&client, "gap", 1, &ranks)).await.unwrap();
    let m = client.checkpoint("gap", 1).await.unwrap();
    let err = client.load_rows(&m, "w", 0, 2).await.unwrap_err();
    assert!(err.to_string().contains("uncovered"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averaging_is_the_elementwise_mean_saved_as_a_new_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path()).await;
    let client = Client::new(&d.url(), ClientOptions { node_local: false, ..Default::default() }).unwrap();
    for (step, base) in [(10, 0.0f32), (20, 10.0), (30, 50.0)] {
        let mut ranks = row_slices("params", 8, &[3], base);
        for (r, t) in ranks.iter_mut().enumerate() {
            t.push(Tensor::whole(format!("other.{r}"), DType::U8, vec![1], Bytes::from(vec![r as u8])));
        }
        bounded(Duration::from_secs(60), save_step(&client, "avg", step, &ranks)).await.unwrap();
    }
    let step = client.average_checkpoints("avg", &[10, 20, 30], &["params"], "avg-avg").await.unwrap();
    assert_eq!(step, 30);
    let m = client.manifest("avg-avg", 30).await.unwrap();
    assert_eq!(m.world_size, 2);
    let cp = client.checkpoint("avg-avg", 30).await.unwrap();
    let (bytes, _) = client.load_rows(&cp, "params", 0, 8).await.unwrap();
    let want: Vec<f32> = (0..8 * COLS).map(|i| i as f32 + 20.0).collect();
    assert_eq!(floats(&bytes), want);
    assert!(m.ranks.iter().all(|r| r.tensors.iter().all(|t| t.name == "params")), "only named tensors are written");
    // A step with another world size cannot be averaged with these.
    save_step(&client, "avg", 40, &row_slices("params", 8, &[2, 5], 0.0)).await.unwrap();
    let err = client.average_checkpoints("avg", &[30, 40], &["params"], "avg-bad").await.unwrap_err();
    assert!(err.to_string().contains("ranks"), "{err}");
}
