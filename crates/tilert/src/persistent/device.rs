//! A compiled program on the device, run by the schedule-replay kernel (`pk_replay`,
//! `kernels/persistent.cu`): the resident runtime's real loop — one block per SM over its stream,
//! acquire/release epoch counters, the step advanced on the device, the per-instruction timeline
//! — with tile bodies that stream exactly the bytes the compiler assigns each tile (from a pool,
//! a distinct range per tile, so nothing is served from L2 twice). It measures what the static
//! schedule and the synchronisation cost on the hardware before any math body is involved, and
//! is the harness the engine's bodies run in.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::abi::{PkInstr, PkState, PkTrace, PK_THREADS};
use super::compile::Program;
use super::validate::validate;
use crate::arena::{dtoh, htod, zero, Arena, DPtr};
use crate::RuntimeError;

/// A validated program uploaded for replay; each [`Replay::launch`] runs one step.
pub struct Replay {
    stream: Arc<CudaStream>,
    func: CudaFunction,
    _arena: Arena,
    instrs: DPtr<PkInstr>,
    offsets: DPtr<u32>,
    counters: DPtr<u32>,
    state: DPtr<PkState>,
    trace: Option<DPtr<PkTrace>>,
    pool: DPtr<u8>,
    pool_off: DPtr<u64>,
    sink: DPtr<u32>,
    blocks: u32,
}

impl Replay {
    /// Validates `program` ([`validate`]), checks that its SMs fit the device, and uploads its
    /// streams, zeroed counters and state, a byte pool of the program's reads and (`trace`) a
    /// timeline buffer.
    pub fn new(
        stream: Arc<CudaStream>,
        program: &Program,
        trace: bool,
    ) -> Result<Replay, RuntimeError> {
        validate(program)
            .map_err(|e| RuntimeError::Invalid(format!("persistent schedule: {e}")))?;
        let ctx = stream.context().clone();
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        if program.options.sms > sms {
            return Err(RuntimeError::Invalid(format!(
                "a program for {} SMs on a device of {sms} (every block must be resident)",
                program.options.sms
            )));
        }
        let module = ultra_kernels::load(&ctx, &ultra_kernels::PERSISTENT)?;
        let func = module.load_function("pk_replay")?;
        let mut arena = Arena::new(stream.clone());
        let mut flat: Vec<PkInstr> = Vec::with_capacity(program.instructions());
        let mut offsets: Vec<u32> = Vec::with_capacity(program.streams.len() + 1);
        let mut pool_off: Vec<u64> = Vec::with_capacity(program.instructions());
        let mut pool_bytes = 0u64;
        for s in &program.streams {
            offsets.push(flat.len() as u32);
            for i in s {
                let tiles = u64::from(i.tile_end - i.tile_begin);
                let per = (u64::from(i.bytes) / tiles) & !15;
                pool_off.push(pool_bytes);
                pool_bytes += per * tiles;
                flat.push(*i);
            }
        }
        offsets.push(flat.len() as u32);
        let instrs = arena.upload(&flat, "persistent instructions")?;
        let offsets_d = arena.upload(&offsets, "persistent stream offsets")?;
        let counters = arena.alloc::<u32>(program.counters.len().max(1), "persistent counters")?;
        let state = arena.alloc::<PkState>(1, "persistent state")?;
        let trace = if trace {
            Some(arena.alloc::<PkTrace>(flat.len(), "persistent timeline")?)
        } else {
            None
        };
        let pool = arena.alloc::<u8>(pool_bytes.max(16) as usize, "replay byte pool")?;
        let pool_off_d = arena.upload(&pool_off, "replay pool offsets")?;
        let sink = arena.alloc::<u32>(1, "replay sink")?;
        zero(&stream, counters)?;
        zero(&stream, state)?;
        stream.synchronize()?;
        Ok(Replay {
            stream,
            func,
            _arena: arena,
            instrs,
            offsets: offsets_d,
            counters,
            state,
            trace,
            pool,
            pool_off: pool_off_d,
            sink,
            blocks: program.options.sms as u32,
        })
    }

    /// Bytes the tiles of one step stream.
    pub fn pool_bytes(&self) -> usize {
        self.pool.len()
    }

    /// Enqueues one step (graph-capturable: the step number lives on the device).
    pub fn launch(&self) -> Result<(), RuntimeError> {
        let addrs = [
            self.instrs.addr(),
            self.offsets.addr(),
            self.counters.addr(),
            self.state.addr(),
            self.trace.map_or(0, |t| t.addr()),
            self.pool.addr(),
            self.pool_off.addr(),
            self.sink.addr(),
        ];
        let mut b = self.stream.launch_builder(&self.func);
        for a in &addrs {
            b.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (PK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `pk_replay(const PkInstr*, const u32*, u32*, PkState*, PkTrace*,
        // const u8*, const u64*, u32*)`; every pointer is a live allocation of this replay sized
        // from the program (or null for an absent trace).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// The timeline records of the last step (flattened stream order); None without a trace
    /// buffer.
    pub fn trace(&self) -> Result<Option<Vec<PkTrace>>, RuntimeError> {
        self.trace.map(|t| dtoh(&self.stream, t)).transpose()
    }

    /// The counters as they are now.
    pub fn counters(&self) -> Result<Vec<u32>, RuntimeError> {
        dtoh(&self.stream, self.counters)
    }

    /// The launch state (steps completed, finished blocks).
    pub fn state(&self) -> Result<PkState, RuntimeError> {
        Ok(dtoh(&self.stream, self.state)?[0])
    }

    /// Sets the step number and counters as if `steps` steps had run (tests of the epoch
    /// arithmetic across the `u32` wrap): counter c = steps · target(c), wrapping.
    pub fn skip_to(&self, program: &Program, steps: u32) -> Result<(), RuntimeError> {
        let c: Vec<u32> = program
            .counters
            .iter()
            .map(|&t| t.wrapping_mul(steps))
            .collect();
        if !c.is_empty() {
            htod(&self.stream, &c, self.counters.slice(0..c.len()))?;
        }
        let st = [PkState {
            step: steps,
            done: steps.wrapping_mul(self.blocks),
        }];
        htod(&self.stream, &st, self.state)?;
        self.stream.synchronize()?;
        Ok(())
    }
}
