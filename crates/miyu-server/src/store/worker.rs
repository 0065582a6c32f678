//! Runs a [`Store`] on its own thread and commits requests in batches: a request is answered
//! only after the batch that holds it is durable, and one flush serves every request that
//! arrived while the previous one was being written (group commit).

use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};

type Reply = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;
type Job = Box<dyn FnOnce(&mut dyn Store) -> Reply + Send>;

/// How many requests may wait for the store before callers are slowed down.
const QUEUE_DEPTH: usize = 8192;

/// A cheap, cloneable handle to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
}

impl StoreHandle {
    /// Starts the store thread. It ends, after a final commit, once every handle is dropped;
    /// join the returned thread to wait for that.
    pub fn spawn(
        mut store: Box<dyn Store>,
        max_batch: usize,
    ) -> std::io::Result<(StoreHandle, std::thread::JoinHandle<()>)> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("miyu-store".into())
            .spawn(move || {
                let mut replies: Vec<Reply> = Vec::with_capacity(max_batch);
                while let Some(job) = queue.blocking_recv() {
                    replies.push(job(store.as_mut()));
                    while replies.len() < max_batch {
                        match queue.try_recv() {
                            Ok(job) => replies.push(job(store.as_mut())),
                            Err(_) => break,
                        }
                    }
                    let committed = store.commit();
                    if let Err(error) = &committed {
                        tracing::error!("store commit failed: {error}");
                    }
                    for reply in replies.drain(..) {
                        reply(committed.as_ref().map(|_| ()));
                    }
                }
            })?;
        Ok((StoreHandle { jobs }, thread))
    }

    /// Runs `operation` on the store thread and returns its result once it is durable.
    pub async fn run<R, F>(&self, operation: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(operation).await?.await
    }

    /// Queues `operation` and returns at once with a future of its durable result. Operations
    /// run in the order they were submitted, so a caller can pipeline requests whose order
    /// matters without waiting for each one's flush.
    pub async fn submit<R, F>(
        &self,
        operation: F,
    ) -> Result<impl Future<Output = Result<R, StoreError>> + Send + 'static, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit_then(operation, |_| {}).await
    }

    /// Like [`submit`](Self::submit), and once the result is durable, runs `on_durable` with it
    /// on the store thread. Hooks run in commit order, before any caller hears of the result:
    /// the place to publish effects whose order matters (such as pushing new log entries).
    pub async fn submit_then<R, F, H>(
        &self,
        operation: F,
        on_durable: H,
    ) -> Result<impl Future<Output = Result<R, StoreError>> + Send + 'static, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<R, StoreError> + Send + 'static,
        H: FnOnce(&R) + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let result = operation(store);
            Box::new(move |committed: Result<(), &StoreError>| {
                let result = match (result, committed) {
                    (Ok(value), Ok(())) => {
                        on_durable(&value);
                        Ok(value)
                    }
                    (Ok(_), Err(error)) => Err(StoreError::CommitFailed(error.to_string())),
                    (Err(error), _) => Err(error),
                };
                // The caller may have gone away; the result is durable or not all the same.
                let _ = answer.send(result);
            })
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        Ok(async move { answered.await.map_err(|_| StoreError::Closed)? })
    }
}
