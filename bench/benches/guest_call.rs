//! Micro-benchmarks of one room instance through the partyhost library's
//! public API, with no sockets or HTTP in the way: starting a room (store,
//! pooled instance, `on-start`), one `on-message` call, and one
//! `on-request` call that broadcasts to a shard's connections. The room is
//! the built-in default room, PartyKit's sharding example.
//!
//! Run with `cargo bench -p partyhost-bench --bench guest_call`.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use clap::Parser;
use partyhost::config::{Config, Limits};
use partyhost::connection::ConnectionHandle;
use partyhost::guest::{RoomHost, Services};
use partyhost::runtime::{GuestMessage, GuestRequest, Runtime};
use wasmtime::Store;

/// Connections of the broadcasting shard: one shard of 5,000 clients split
/// over 5 shards.
const SHARD_CONNECTIONS: usize = 1_000;

/// Size of a message or request body, in bytes, as in the fan-out scenario.
const MESSAGE_BYTES: usize = 100;

/// CPU time a benchmarked call may take, as the host's default
/// `--call-timeout`.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Gives the next guest call its deadline, as the host does before each call.
fn arm_deadline(store: &mut Store<RoomHost>) {
    store.data_mut().call_deadline = Instant::now() + CALL_TIMEOUT;
    store.set_epoch_deadline(1);
}

/// Connection handles with unbounded outbound queues and no socket behind
/// them, so a broadcast only queues frames.
fn connections(room: &Arc<str>, count: usize) -> impl Iterator<Item = (Arc<str>, ConnectionHandle)> + '_ {
    (0..count).map(move |index| {
        let id: Arc<str> = format!("conn-{index}").into();
        (id.clone(), ConnectionHandle::new(id, room.clone(), usize::MAX))
    })
}

/// Store data for a room, with no publish forwarder behind it.
fn room_host(room: &Arc<str>, services: &Services) -> RoomHost {
    let (publishes, _published) = tokio::sync::mpsc::channel(16);
    RoomHost::new(room.clone(), publishes, services.clone())
}

fn bench_guest(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("failed to start the tokio runtime");
    let runtime = Runtime::new("built-in default room", partyhost::DEFAULT_ROOM_WASM, &Limits::default())
        .expect("failed to compile the default room");
    let room: Arc<str> = "bench-1".into();
    let data_dir = std::env::temp_dir().join(format!("partyhost-bench-{}", std::process::id()));
    let data_dir_arg = data_dir.to_str().expect("UTF-8 temporary path");
    let config = Config::parse_from(["partyhost", "--data-dir", data_dir_arg]);
    let services = Services::open(&config).expect("failed to open storage for the benchmark");

    c.bench_function("room_start_and_drop", |b| {
        b.iter(|| {
            tokio.block_on(async {
                let mut store = runtime.new_store(room_host(&room, &services));
                let party = runtime.instantiate(&mut store).await.expect("instantiate");
                arm_deadline(&mut store);
                party.call_on_start(&mut store).await.expect("on-start");
            })
        })
    });

    let mut store = runtime.new_store(room_host(&room, &services));
    let party = tokio.block_on(runtime.instantiate(&mut store)).expect("instantiate");
    arm_deadline(&mut store);
    tokio.block_on(party.call_on_start(&mut store)).expect("on-start");

    let message = GuestMessage::Text("m".repeat(MESSAGE_BYTES));
    let sender = "conn-0".to_string();
    c.bench_function("on_message_noop", |b| {
        b.iter(|| {
            arm_deadline(&mut store);
            tokio.block_on(party.call_on_message(&mut store, &sender, &message)).expect("on-message");
        })
    });

    let request = GuestRequest {
        method: "POST".into(),
        url: "/parties/router/bench".into(),
        headers: vec![("content-type".into(), "text/plain".into())],
        body: vec![b'.'; MESSAGE_BYTES],
    };
    c.bench_function("on_request_no_connections", |b| {
        b.iter(|| {
            arm_deadline(&mut store);
            tokio.block_on(party.call_on_request(&mut store, &request)).expect("on-request");
        })
    });

    // Fresh connection handles for every iteration, made outside the timed
    // part, so that outbound queues do not grow across iterations.
    let store = RefCell::new(store);
    let mut group = c.benchmark_group("on_request_broadcast");
    group.throughput(criterion::Throughput::Elements(SHARD_CONNECTIONS as u64));
    group.bench_function(format!("{SHARD_CONNECTIONS}_connections"), |b| {
        b.iter_batched(
            || {
                let mut store = store.borrow_mut();
                store.data_mut().connections = connections(&room, SHARD_CONNECTIONS).collect();
            },
            |()| {
                let mut store = store.borrow_mut();
                arm_deadline(&mut store);
                tokio.block_on(party.call_on_request(&mut *store, &request)).expect("on-request");
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&data_dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_guest
}
criterion_main!(benches);
