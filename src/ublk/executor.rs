//! A minimal single-threaded executor for the per-tag tasks of one ublk queue.
//!
//! libublk's futures (ring operations, io commands) are woken from the queue thread
//! itself when their completion is reaped, so the executor only needs a ready list:
//! the queue loop waits on the ring, reaps completions (which wakes tasks) and then
//! polls every task that was woken. Futures are `!Send` (they borrow the queue), so
//! this never leaves the thread that created it.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;

/// A boxed task future.
type Task<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// The list of task ids woken since the last run, shared with the wakers.
#[derive(Default)]
struct ReadyList {
    ids: Mutex<Vec<usize>>,
}

/// Waker of one task: puts its id on the ready list once until it is polled again.
struct TaskWaker {
    id: usize,
    queued: AtomicBool,
    ready: Arc<ReadyList>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.ids.lock().push(self.id);
        }
    }
}

/// One slot of the executor: the future (None once finished) and its waker, built once
/// (polling lends it, so a poll costs no reference counting).
struct Slot<'a> {
    future: Option<Task<'a>>,
    task_waker: Arc<TaskWaker>,
    waker: Rc<Waker>,
}

/// Runs the tasks of one queue thread; see the module documentation.
pub struct LocalExecutor<'a> {
    slots: RefCell<Vec<Slot<'a>>>,
    ready: Arc<ReadyList>,
    /// The other half of the ready list, swapped in and out so that a run allocates
    /// nothing.
    spare: RefCell<Vec<usize>>,
    live: std::cell::Cell<usize>,
}

impl Default for LocalExecutor<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> LocalExecutor<'a> {
    /// An executor with no tasks.
    pub fn new() -> Self {
        LocalExecutor {
            slots: RefCell::new(Vec::new()),
            ready: Arc::new(ReadyList::default()),
            spare: RefCell::new(Vec::new()),
            live: std::cell::Cell::new(0),
        }
    }

    /// Adds a task; it first runs at the next [`LocalExecutor::run_ready`].
    pub fn spawn(&self, fut: impl Future<Output = ()> + 'a) {
        let mut slots = self.slots.borrow_mut();
        let id = slots.len();
        let task_waker = Arc::new(TaskWaker {
            id,
            queued: AtomicBool::new(true),
            ready: self.ready.clone(),
        });
        slots.push(Slot {
            future: Some(Box::pin(fut)),
            waker: Rc::new(Waker::from(task_waker.clone())),
            task_waker,
        });
        self.ready.ids.lock().push(id);
        self.live.set(self.live.get() + 1);
    }

    /// Polls every woken task until none is left ready; returns how many polls ran.
    pub fn run_ready(&self) -> usize {
        let mut polled = 0;
        let mut ids = std::mem::take(&mut *self.spare.borrow_mut());
        loop {
            std::mem::swap(&mut *self.ready.ids.lock(), &mut ids);
            if ids.is_empty() {
                break;
            }
            for &id in &ids {
                polled += 1;
                self.poll_one(id);
            }
            ids.clear();
        }
        *self.spare.borrow_mut() = ids;
        polled
    }

    /// Polls task `id` once, if it is still alive.
    fn poll_one(&self, id: usize) {
        // Take the future out of its slot so that polling it may touch the executor.
        let (fut, waker) = {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(id) else {
                return;
            };
            slot.task_waker.queued.store(false, Ordering::Release);
            match slot.future.take() {
                Some(f) => (f, slot.waker.clone()),
                None => return,
            }
        };
        let mut fut = fut;
        let mut cx = Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(()) => {
                self.live.set(self.live.get().saturating_sub(1));
            }
            Poll::Pending => {
                if let Some(slot) = self.slots.borrow_mut().get_mut(id) {
                    slot.future = Some(fut);
                }
            }
        }
    }

    /// Whether every task has finished.
    pub fn is_done(&self) -> bool {
        self.live.get() == 0
    }

    /// How many tasks have not finished.
    pub fn live_tasks(&self) -> usize {
        self.live.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A future that is pending until `flag` is set, and wakes through a shared slot.
    struct Gate {
        flag: Rc<Cell<bool>>,
        waker: Rc<RefCell<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.flag.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    #[test]
    fn runs_tasks_to_completion_when_woken() {
        let exe = LocalExecutor::new();
        let flag = Rc::new(Cell::new(false));
        let slot: Rc<RefCell<Option<Waker>>> = Rc::new(RefCell::new(None));
        let done = Rc::new(Cell::new(0));
        for _ in 0..3 {
            let gate = Gate {
                flag: flag.clone(),
                waker: slot.clone(),
            };
            let done = done.clone();
            exe.spawn(async move {
                gate.await;
                done.set(done.get() + 1);
            });
        }
        exe.spawn(async {});
        assert_eq!(exe.run_ready(), 4);
        assert_eq!(exe.live_tasks(), 3);
        assert!(!exe.is_done());
        // Nothing woken: nothing polled.
        assert_eq!(exe.run_ready(), 0);
        flag.set(true);
        // Only the last registered waker is kept; waking it finishes one task.
        if let Some(w) = slot.borrow_mut().take() {
            w.wake();
        }
        exe.run_ready();
        assert_eq!(done.get(), 1);
        assert_eq!(exe.live_tasks(), 2);
    }

    #[test]
    fn double_wake_polls_once() {
        let exe = LocalExecutor::new();
        let flag = Rc::new(Cell::new(false));
        let slot: Rc<RefCell<Option<Waker>>> = Rc::new(RefCell::new(None));
        let polls = Rc::new(Cell::new(0));
        {
            let gate_flag = flag.clone();
            let gate_slot = slot.clone();
            let polls = polls.clone();
            exe.spawn(async move {
                polls.set(polls.get() + 1);
                Gate {
                    flag: gate_flag,
                    waker: gate_slot,
                }
                .await;
            });
        }
        exe.run_ready();
        let w = slot.borrow_mut().take();
        if let Some(w) = w {
            w.wake_by_ref();
            w.wake_by_ref();
        }
        assert_eq!(exe.run_ready(), 1);
        flag.set(true);
        if let Some(w) = slot.borrow_mut().take() {
            w.wake();
        }
        exe.run_ready();
        assert!(exe.is_done());
        assert_eq!(polls.get(), 1);
    }
}
