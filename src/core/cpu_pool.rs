//! Threads for CPU-side request work (decoding, resizing) that yield to tensor work. On a CPU device
//! libtorch's OpenMP threads and the decoders share the same cores; a decoder that preempts one OpenMP
//! thread stalls every barrier of the forward pass. At the lowest scheduling priority the decoders run
//! in the gaps instead (and freely beside a GPU, where the cores are otherwise idle).

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

use super::CoreError;

type Task = Box<dyn FnOnce() + Send>;

pub struct CpuPool {
    sender: Sender<Task>,
}

impl CpuPool {
    /// `threads` workers at nice 19, with room for `capacity` queued tasks.
    pub fn new(threads: usize, capacity: usize) -> Result<Self, CoreError> {
        let (sender, receiver) = crossbeam_channel::bounded::<Task>(capacity.max(1));
        for i in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("editserve-cpu-{i}"))
                .spawn(move || {
                    lower_priority();
                    while let Ok(task) = receiver.recv() {
                        task();
                    }
                })
                .map_err(|e| CoreError::Internal(format!("cannot start a CPU pool thread: {e}")))?;
        }
        Ok(Self { sender })
    }

    /// Runs `work` on the pool; a full queue answers `Overloaded` at once.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, CoreError> {
        let (reply, answer) = oneshot::channel();
        let task: Task = Box::new(move || {
            let _ = reply.send(work());
        });
        match self.sender.try_send(task) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(CoreError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(CoreError::ShuttingDown),
        }
        answer.await.map_err(|_| CoreError::Internal("a CPU pool task panicked".into()))
    }
}

#[cfg(target_os = "linux")]
pub(crate) fn lower_priority() {
    // SAFETY: on Linux, PRIO_PROCESS with id 0 sets the nice value of the calling thread only.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lower_priority() {}
