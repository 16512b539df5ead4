//! Task events to containerd (on TTRPC_ADDRESS) through the crate's
//! publisher, which queues and retries: a containerd that restarts gets the
//! events it missed while it was away, within the publisher's retry budget.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};

pub use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
pub use containerd_shim_protos::topics;

/// The publisher and the namespace the events belong to.
#[derive(Clone)]
pub struct Events {
    publisher: Arc<RemotePublisher>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher: Arc::new(publisher),
            namespace: namespace.to_string(),
        }
    }

    /// Queues one event. A failure is logged, never returned: an event that
    /// cannot be sent must not fail the task call that caused it.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        tracing::debug!(topic, "publishing");
        if let Err(e) = self
            .publisher
            .publish(Default::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "publishing an event failed");
        }
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    })
}
