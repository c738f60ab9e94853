//! The executor threads of a device: each runs whole forward passes on its own libtorch thread team and
//! answers the requests of its pass.

use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tch::{Device, Kind, Tensor};

use super::{guarded, BatchingConfig, CoreError, EditActivity, PendingClassify, Probabilities};
use crate::imaging::InputTensor;
use crate::models::Classifier;

/// One forward pass: a storage-sharing handle of the version and the requests it answers.
pub(super) struct Pass {
    pub(super) model: Box<dyn Classifier>,
    pub(super) group: Vec<PendingClassify>,
}

/// How often the batching thread, holding work while a running edit job keeps an executor idle, looks
/// whether the job has ended (which sends no message).
const EDIT_POLL: Duration = Duration::from_millis(5);

/// The executor threads and the count of those free, as the batching thread sees it.
pub(super) struct Executors {
    /// None once dropping: the executors then finish their passes and stop.
    passes: Option<Sender<Pass>>,
    /// One message each time an executor finishes a pass (and once when it starts).
    freed: Receiver<()>,
    free: usize,
    streams: usize,
    threads: Vec<JoinHandle<()>>,
    /// On a CPU, each running edit job takes one executor's core (never the last one): one-thread passes on
    /// every core would leave the lowest-priority edit worker no time at all.
    edits: Option<EditActivity>,
}

impl Executors {
    pub(super) fn spawn(device: Device, config: &BatchingConfig, edits: EditActivity) -> Result<Self, CoreError> {
        let streams = config.streams.get();
        let (passes, queued) = crossbeam_channel::bounded::<Pass>(streams);
        let (freed_sender, freed) = crossbeam_channel::bounded(streams);
        let mut threads = Vec::with_capacity(streams);
        for i in 0..streams {
            let (queued, freed_sender) = (queued.clone(), freed_sender.clone());
            let (intra_op, max_batch_size) = (config.threads_per_stream, config.max_batch_size);
            let thread = std::thread::Builder::new()
                .name(format!("editserve-{device:?}-pass-{i}").to_lowercase())
                .spawn(move || {
                    if let Some(intra_op) = intra_op {
                        tch::set_num_threads(i32::try_from(intra_op.get()).unwrap_or(i32::MAX));
                    }
                    let _no_grad = tch::no_grad_guard();
                    while freed_sender.send(()).is_ok() {
                        let Ok(pass) = queued.recv() else { break };
                        answer(pass, device, max_batch_size);
                    }
                })
                .map_err(|e| CoreError::Internal(format!("cannot start an executor thread: {e}")))?;
            threads.push(thread);
        }
        let edits = (!device.is_cuda() && streams > 1).then_some(edits);
        Ok(Self { passes: Some(passes), freed, free: 0, streams, threads, edits })
    }

    /// Executors that may take a pass now: free ones, within the share running edit jobs leave.
    pub(super) fn available(&self) -> usize {
        let reserved = self.edits.as_ref().map_or(0, |e| e.load(Ordering::SeqCst).min(self.streams - 1));
        let busy = self.streams.saturating_sub(self.free);
        self.free.min((self.streams - reserved).saturating_sub(busy))
    }

    /// Blocks until an executor is available; false once they have all stopped.
    pub(super) fn wait_until_free(&mut self) -> bool {
        loop {
            while self.freed.try_recv().is_ok() {
                self.free += 1;
            }
            if self.available() > 0 {
                return true;
            }
            match self.freed.recv_timeout(EDIT_POLL) {
                Ok(()) => self.free += 1,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    pub(super) fn run(&mut self, pass: Pass) {
        if !self.wait_until_free() {
            return fail(pass.group, &CoreError::ShuttingDown);
        }
        self.free -= 1;
        let Some(passes) = &self.passes else {
            return fail(pass.group, &CoreError::ShuttingDown);
        };
        if let Err(unsent) = passes.send(pass) {
            fail(unsent.into_inner().group, &CoreError::ShuttingDown);
        }
    }
}

/// Waits for the executors to finish: a thread still running libtorch while the process exits races the
/// library's static destructors (glibc aborted with "corrupted double-linked list" at shutdown).
impl Drop for Executors {
    fn drop(&mut self) {
        self.passes.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

pub(super) fn fail(group: Vec<PendingClassify>, error: &CoreError) {
    for pending in group {
        let _ = pending.reply.send(Err(error.clone()));
    }
}

/// Runs a pass on the executor's thread and answers each request with its own images' probabilities.
fn answer(pass: Pass, device: Device, max_batch_size: usize) {
    let Pass { model, group } = pass;
    let inputs: Vec<&InputTensor> = group.iter().flat_map(|p| p.inputs.iter()).collect();
    match guarded(|| forward(model.as_ref(), &inputs, device, max_batch_size)).and_then(|r| r) {
        Ok(probabilities) => {
            let mut probabilities = probabilities.into_iter();
            for pending in group {
                let mine: Probabilities = probabilities.by_ref().take(pending.inputs.len()).collect();
                let _ = pending.reply.send(Ok(mine));
            }
        }
        Err(e) => fail(group, &e),
    }
}

fn forward(
    model: &dyn Classifier,
    inputs: &[&InputTensor],
    device: Device,
    max_batch_size: usize,
) -> Result<Probabilities, CoreError> {
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(max_batch_size.max(1)) {
        let started = Instant::now();
        let (h, w) = (i64::from(chunk[0].height), i64::from(chunk[0].width));
        let mut flat = Vec::with_capacity(chunk.len() * chunk[0].data.len());
        for input in chunk {
            flat.extend_from_slice(&input.data);
        }
        let batch = Tensor::from_slice(&flat).view([chunk.len() as i64, 3, h, w]).to_device(device);
        let probs = model.forward(&batch).softmax(-1, Kind::Float).to_device(Device::Cpu);
        let classes = probs.size()[1] as usize;
        let values: Vec<f32> = probs
            .flatten(0, -1)
            .try_into()
            .map_err(|e: tch::TchError| CoreError::Internal(format!("cannot read the probabilities: {e}")))?;
        out.extend(values.chunks(classes).map(<[f32]>::to_vec));
        metrics::histogram!("editserve_inference_batch_size").record(chunk.len() as f64);
        metrics::histogram!("editserve_inference_seconds").record(started.elapsed().as_secs_f64());
    }
    Ok(out)
}
