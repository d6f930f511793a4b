//! A save's spans, exported through an in-memory OpenTelemetry exporter from ckptd running in
//! this process: every request of the save and its commit are in one trace (the save's, derived
//! from job and step, whichever rank sent them), carry job and step, and come in the save's
//! order: the open, the chunks, the ranks' indexes, then the commit.

use std::time::Duration;

use ckpt_client::{Client, ClientOptions, DType, SaveSpec, Tensor, Wait};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_save_is_one_trace_with_its_spans_in_order() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ckptd")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let config = ckpt_service::Config {
        listen: "127.0.0.1:0".into(),
        store: dir.path().join("store").to_string_lossy().into_owned(),
        data_dir: dir.path().join("state"),
        addr_file: Some(addr_file.clone()),
        ..ckpt_service::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ckpt_service::serve_until(config, None, async move {
        let _ = stopped.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        assert!(std::time::Instant::now() < deadline, "ckptd did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let opts = ClientOptions { chunk_bytes: 1 << 20, node_local: false, ..ClientOptions::default() };
    let client = Client::new(&format!("http://{addr}"), opts).unwrap();
    let world = 2u32;
    let saves = (0..world).map(|rank| {
        let client = client.clone();
        async move {
            let mut data = vec![0u8; 3 << 20];
            blake3::Hasher::new().update(&rank.to_le_bytes()).finalize_xof().fill(&mut data);
            let t = Tensor::whole(format!("w{rank}"), DType::U8, vec![data.len() as u64], bytes::Bytes::from(data));
            let spec = SaveSpec {
                job: "job".into(),
                step: 7,
                rank,
                world_size: world,
                metadata: serde_json::Value::Null,
                rank_metadata: serde_json::Value::Null,
                created_unix_ms: Some(1),
                node_ranks: None,
            };
            client.save(&spec, &[t], Wait::Committed).await.unwrap()
        }
    });
    futures::future::join_all(saves).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), server).await.unwrap().unwrap().unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let trace_id = opentelemetry::trace::TraceId::from_bytes(ckpt_core::trace::save_trace_id("job", 7));
    let of = |name: &str| -> Vec<&SpanData> {
        let mut v: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
        v.sort_by_key(|s| s.start_time);
        v
    };
    let (opens, chunks, indexes, commits) = (of("save.open"), of("chunk.put"), of("save.index"), of("save.commit"));
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(opens.len(), world as usize, "{names:?}");
    assert_eq!(chunks.len(), 6, "three 1 MiB chunks per rank: {names:?}");
    assert_eq!(indexes.len(), world as usize);
    assert_eq!(commits.len(), 1, "{names:?}");
    for s in opens.iter().chain(&chunks).chain(&indexes).chain(&commits) {
        assert_eq!(s.span_context.trace_id(), trace_id, "{} is not in the save's trace", s.name);
        assert_eq!(attr(s, "job").as_deref(), Some("job"), "{} carries the job", s.name);
    }
    for s in opens.iter().chain(&indexes).chain(&commits) {
        assert_eq!(attr(s, "step").as_deref(), Some("7"), "{} carries the step", s.name);
    }
    let ranks: std::collections::BTreeSet<String> = indexes.iter().filter_map(|s| attr(s, "rank")).collect();
    assert_eq!(ranks.len(), 2, "each index span names its rank");
    // Order: the first open before any chunk, each chunk before the last index, the commit
    // after every index began.
    assert!(opens[0].start_time <= chunks[0].start_time);
    assert!(chunks.iter().all(|c| c.end_time <= indexes.last().unwrap().end_time));
    assert!(indexes.iter().all(|i| i.start_time <= commits[0].start_time));
    // The request spans around them are children in the same trace (the client's traceparent).
    let requests: Vec<&SpanData> = spans.iter().filter(|s| s.name == "request").collect();
    assert!(requests.iter().filter(|r| r.span_context.trace_id() == trace_id).count() >= 10, "{names:?}");
}
