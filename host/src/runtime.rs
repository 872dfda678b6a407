//! The WebAssembly runtime: one wasmtime `Engine` for the process, the room
//! component compiled and linked once, and the limits every instance runs
//! under.
//!
//! Instances come from a pooling allocator with copy-on-write memory images,
//! so starting a room costs a slot from the pool rather than a compilation
//! or a fresh mapping. The pool's size is `--max-rooms`; a room asked for
//! past it fails with [`is_pool_exhausted`] true. CPU is bounded with epoch
//! interruption: one ticker thread advances the epoch every [`EPOCH_TICK`],
//! and a guest call yields to the tokio scheduler at each tick until its
//! deadline passes, when it is interrupted. A spinning guest therefore holds
//! a worker thread for one tick at a time, not for its whole deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use crate::config::Limits;
use crate::guest::RoomHost;

pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "party",
        exports: { default: async },
    });
}

pub use bindings::partyhost::room::types::{Message as GuestMessage, Request as GuestRequest};
pub use bindings::partyhost::room::types::Response as GuestResponse;
pub use bindings::partyhost::room::types::Admission as GuestAdmission;
pub use bindings::{Party, PartyPre};

/// Largest module file partyhost reads, in bytes.
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// Interval of the epoch ticker, and so the longest a guest call runs before
/// it yields to other tasks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Native stack a guest may use. A deeper recursion traps with a stack
/// overflow instead of crashing the host.
const MAX_WASM_STACK: usize = 1 << 20;

/// Core module instances, memories and tables one component may create. A
/// Rust component built for wasm32-wasip2 uses one memory, and a handful of
/// core instances for its shims.
const CORE_INSTANCES_PER_COMPONENT: u32 = 10;
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 4;

/// The compiled room component and everything needed to instantiate it.
pub struct Runtime {
    engine: Engine,
    party: PartyPre<RoomHost>,
    limits: Limits,
    /// Origin of the component, for logs: a path or "built-in".
    pub source: String,
    /// Time compiling and linking took.
    pub compile_time: Duration,
}

impl Runtime {
    /// Compiles `wasm`, checks that it is a room component, and starts the
    /// epoch ticker. `source` names the module in errors ("room.wasm").
    pub fn new(source: &str, wasm: &[u8], limits: &Limits) -> Result<Arc<Runtime>> {
        let started = Instant::now();
        let engine = Engine::new(&engine_config(limits))
            .map_err(anyhow::Error::from)
            .context("failed to configure wasmtime")?;

        if !wasm.starts_with(b"\0asm") {
            anyhow::bail!(
                "`{source}` is not a WebAssembly component: it does not start with the WebAssembly \
                 magic bytes. Build rooms with `cargo build --target wasm32-wasip2` and the partyhost SDK"
            );
        }
        let component = Component::new(&engine, wasm).map_err(|err| {
            // wasmparser formats some details over several lines.
            let detail = format!("{err:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            // wasmtime checks a component against the pool's limits while
            // compiling it, and reports a violation only as text.
            if detail.contains("pooling allocator") {
                return anyhow::anyhow!(
                    "`{source}` does not fit the instance limits: {detail}. Raise --table-elements \
                     or --memory-limit"
                );
            }
            anyhow::anyhow!(
                "`{source}` is not a WebAssembly component: {detail}. Build rooms with \
                 `cargo build --target wasm32-wasip2` and the partyhost SDK"
            )
        })?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("failed to link WASI into the room")?;
        Party::add_to_linker::<_, HasSelf<RoomHost>>(&mut linker, |host| host)
            .map_err(anyhow::Error::from)
            .context("failed to link the partyhost imports into the room")?;

        let instance_pre = linker.instantiate_pre(&component).map_err(|err| {
            anyhow::anyhow!("`{source}` imports something partyhost does not provide: {err:#}")
        })?;
        let party = PartyPre::new(instance_pre).map_err(|err| {
            anyhow::anyhow!(
                "`{source}` is not a partyhost room: {err:#}. A room exports on-start, \
                 on-connect, on-message, on-close and on-request; build it with the partyhost SDK"
            )
        })?;

        spawn_epoch_ticker(engine.weak());

        Ok(Arc::new(Runtime {
            engine,
            party,
            limits: limits.clone(),
            source: source.to_string(),
            compile_time: started.elapsed(),
        }))
    }

    /// Reads and compiles a module file of at most [`MAX_MODULE_BYTES`].
    pub fn from_file(path: &Path, limits: &Limits) -> Result<Arc<Runtime>> {
        use std::io::Read;

        let too_large = || {
            anyhow::anyhow!(
                "module `{}` is larger than {} MiB: a room component is far smaller",
                path.display(),
                MAX_MODULE_BYTES >> 20
            )
        };
        let file = std::fs::File::open(path).with_context(|| format!("failed to read module `{}`", path.display()))?;
        let declared = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
        if declared > MAX_MODULE_BYTES {
            return Err(too_large());
        }
        // Devices and pipes declare no length, so the read is bounded too.
        let mut wasm = Vec::new();
        file.take(MAX_MODULE_BYTES + 1)
            .read_to_end(&mut wasm)
            .with_context(|| format!("failed to read module `{}`", path.display()))?;
        if wasm.len() as u64 > MAX_MODULE_BYTES {
            return Err(too_large());
        }
        Runtime::new(&path.display().to_string(), &wasm, limits)
    }

    /// Creates a store for `host` with the CPU deadline installed. The store
    /// holds no instance yet.
    pub fn new_store(&self, host: RoomHost) -> Store<RoomHost> {
        let mut store = Store::new(&self.engine, host);
        store.epoch_deadline_callback(|context| {
            if Instant::now() >= context.data().call_deadline {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        store
    }

    /// Instantiates the room component in `store`.
    pub async fn instantiate(&self, store: &mut Store<RoomHost>) -> wasmtime::Result<Party> {
        store.data_mut().call_deadline = Instant::now() + self.limits.call_timeout();
        store.set_epoch_deadline(1);
        let party = self.party.instantiate_async(store).await?;
        Ok(party)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// Returns true when `err` shows that the instance pool has no free slot, which is
/// a capacity problem of the host and not a fault of the room.
pub fn is_pool_exhausted(err: &wasmtime::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some())
}

fn engine_config(limits: &Limits) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    // Host functions and WASI run on the same fiber stack as the guest, so
    // the fiber gets room above the guest's own limit.
    config.async_stack_size(MAX_WASM_STACK + (1 << 20));

    let rooms = limits.max_rooms;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(rooms);
    pool.total_core_instances(rooms.saturating_mul(CORE_INSTANCES_PER_COMPONENT));
    pool.max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT);
    pool.total_memories(rooms.saturating_mul(MEMORIES_PER_COMPONENT));
    pool.max_memories_per_component(MEMORIES_PER_COMPONENT);
    pool.total_tables(rooms.saturating_mul(TABLES_PER_COMPONENT));
    pool.max_tables_per_component(TABLES_PER_COMPONENT);
    pool.table_elements(limits.table_elements);
    pool.max_memory_size(limits.memory_limit_bytes());
    // One fiber stack per room that is inside a guest call at the same time.
    pool.total_stacks(rooms);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is
/// dropped.
fn spawn_epoch_ticker(engine: wasmtime::EngineWeak) {
    std::thread::Builder::new()
        .name("partyhost-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            let Some(engine) = engine.upgrade() else {
                return;
            };
            engine.increment_epoch();
        })
        .expect("failed to spawn the epoch ticker thread");
}
