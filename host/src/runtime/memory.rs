//! Plugin memory: each instance's cap (`plugin_memory_bytes`, or the manifest's) and the
//! node's budget for all of them together (`plugin_memory_total_bytes`), charged as
//! linear memories grow and given back when the instance is dropped.
//!
//! Growth past an instance's cap traps: the plugin asked for more than it may have. Growth
//! past the node's budget traps too, with [`NodeMemoryFull`], which the room reports as
//! the node's refusal, not as the plugin's crash (it does not count toward quarantine:
//! another plugin may have filled the node).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::ResourceLimiter;

/// The linear memory all instances of the node hold, against its budget.
#[derive(Debug)]
pub struct NodeMemory {
    held: AtomicUsize,
    budget: usize,
}

impl NodeMemory {
    /// A budget of `budget` bytes, none held.
    pub fn new(budget: usize) -> Self {
        NodeMemory {
            held: AtomicUsize::new(0),
            budget,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit the budget.
    fn take(&self, bytes: usize) -> bool {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.budget {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The error a memory growth past the node's budget traps with.
#[derive(Debug, thiserror::Error)]
#[error("the node's plugin memory budget of {0} bytes (plugin_memory_total_bytes) is used up")]
pub struct NodeMemoryFull(pub usize);

/// The error a memory growth past the instance's own cap traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory cap of {0} bytes reached")]
pub struct InstanceMemoryFull(pub usize);

/// The resource limits of one store.
pub struct Limiter {
    node: Arc<NodeMemory>,
    /// The cap of this instance's linear memories together.
    cap: usize,
    /// What this store's memories hold.
    held: usize,
    instances: usize,
    memories: usize,
    tables: usize,
}

impl Limiter {
    /// Limits for one store: `cap` bytes of memory at most, charged to `node`, and at
    /// most `instances` core instances, `memories` memories and `tables` tables.
    pub fn new(
        node: Arc<NodeMemory>,
        cap: usize,
        instances: usize,
        memories: usize,
        tables: usize,
    ) -> Self {
        Limiter {
            node,
            cap,
            held: 0,
            instances,
            memories,
            tables,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        if self.held.saturating_add(growth) > self.cap {
            return Err(InstanceMemoryFull(self.cap).into());
        }
        if !self.node.take(growth) {
            return Err(NodeMemoryFull(self.node.budget).into());
        }
        self.held += growth;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.memories
    }

    fn tables(&self) -> usize {
        self.tables
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.node.give_back(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_charged_to_the_node_and_given_back_with_the_store() {
        let node = Arc::new(NodeMemory::new(100));
        let mut a = Limiter::new(node.clone(), 80, 1, 1, 1);
        let mut b = Limiter::new(node.clone(), 80, 1, 1, 1);
        assert!(a.memory_growing(0, 60, None).is_ok());
        let err = a
            .memory_growing(60, 90, None)
            .expect_err("over the instance cap");
        assert!(err.downcast_ref::<InstanceMemoryFull>().is_some());
        let err = b
            .memory_growing(0, 50, None)
            .expect_err("over the node budget");
        assert!(err.downcast_ref::<NodeMemoryFull>().is_some());
        assert!(b.memory_growing(0, 40, None).is_ok());
        assert_eq!(node.held(), 100);
        drop(a);
        assert_eq!(node.held(), 40);
        drop(b);
        assert_eq!(node.held(), 0);
    }
}
