//! The event bus: typed publish/subscribe where a slow subscriber never blocks a publisher.
//!
//! Each subscriber owns a bounded queue. Publishing tries to push into every subscriber's
//! queue and, when one is full, drops the event *for that subscriber only* and counts the
//! drop, so a stalled console tab or GC scheduler costs the publisher one failed push, never a
//! wait. Subscribers that need every event must keep up or size their queue; those that
//! cannot (the GC scheduler) also have a timer to fall back on.
//!
//! Events are plain Rust types implementing [`Event`]. Besides typed subscriptions there is an
//! *any-event* subscription, which receives every event as a [`DynEvent`]; it exists for
//! consumers that match events by topic and fields described in data, such as persisted GC
//! triggers ([`EventMatcher`]).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// An event that can travel on the bus.
pub trait Event: Clone + Debug + Send + Sync + 'static {
    /// The event's topic, such as `host.status-changed`.
    fn topic(&self) -> &'static str;
    /// A named field as text, for matching (`hostUuid`, `newStatus`, ...).
    fn field(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}

/// An event seen through the any-event subscription.
pub trait DynEvent: Debug + Send + Sync {
    /// See [`Event::topic`].
    fn topic(&self) -> &'static str;
    /// See [`Event::field`].
    fn field(&self, name: &str) -> Option<String>;
    /// The concrete event, for downcasting.
    fn as_any(&self) -> &dyn Any;
}

impl<E: Event> DynEvent for E {
    fn topic(&self) -> &'static str {
        Event::topic(self)
    }
    fn field(&self, name: &str) -> Option<String> {
        Event::field(self, name)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A predicate over events that can be stored: a topic and field values that must all match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMatcher {
    /// The topic the event must have.
    pub topic: String,
    /// Fields the event must have, with these exact values.
    pub fields: Vec<(String, String)>,
}

impl EventMatcher {
    /// Matches every event of `topic`.
    pub fn topic(topic: &str) -> Self {
        EventMatcher { topic: topic.to_owned(), fields: Vec::new() }
    }

    /// Also requires `field` to equal `value`.
    pub fn field(mut self, field: &str, value: impl ToString) -> Self {
        self.fields.push((field.to_owned(), value.to_string()));
        self
    }

    /// Whether `event` matches.
    pub fn matches(&self, event: &dyn DynEvent) -> bool {
        event.topic() == self.topic
            && self.fields.iter().all(|(name, value)| event.field(name).as_deref() == Some(value))
    }
}

#[derive(Debug)]
struct Subscriber<T> {
    name: String,
    tx: mpsc::Sender<T>,
    dropped: AtomicU64,
    delivered: AtomicU64,
}

/// A subscriber to every event.
type AnySubscriber = Subscriber<Arc<dyn DynEvent>>;

/// A subscriber's queue: receive events with [`Subscription::recv`].
#[derive(Debug)]
pub struct Subscription<T> {
    rx: mpsc::Receiver<T>,
    shared: Arc<Subscriber<T>>,
}

impl<T> Subscription<T> {
    /// The next event; `None` once the bus is gone.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Events dropped because this subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// One subscriber as seen by inspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubscriberInfo {
    /// The name given at subscription.
    pub name: String,
    /// Events queued and not yet received.
    pub queued: usize,
    /// Events delivered into the queue.
    pub delivered: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
}

trait Sink: Send + Sync {
    fn info(&self) -> SubscriberInfo;
    fn is_closed(&self) -> bool;
    fn as_any(&self) -> &dyn Any;
}

impl<T: Send + Sync + 'static> Sink for Subscriber<T> {
    fn info(&self) -> SubscriberInfo {
        SubscriberInfo {
            name: self.name.clone(),
            queued: self.tx.max_capacity() - self.tx.capacity(),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<T> Subscriber<T> {
    /// Pushes without waiting; returns false when the subscriber is gone.
    fn offer(&self, event: T) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[derive(Default)]
struct BusInner {
    typed: RwLock<HashMap<TypeId, Vec<Arc<dyn Sink>>>>,
    any: RwLock<Vec<Arc<AnySubscriber>>>,
    published: AtomicU64,
}

/// The event bus. Cheap to clone; clones share subscribers.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

impl Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("published", &self.inner.published.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes to events of type `E`, keeping at most `capacity` unreceived.
    pub fn subscribe<E: Event>(&self, name: &str, capacity: usize) -> Subscription<E> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Subscriber {
            name: name.to_owned(),
            tx,
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        self.inner
            .typed
            .write()
            .expect("bus lock")
            .entry(TypeId::of::<E>())
            .or_default()
            .push(shared.clone());
        Subscription { rx, shared }
    }

    /// Subscribes to every event, keeping at most `capacity` unreceived.
    pub fn subscribe_all(&self, name: &str, capacity: usize) -> Subscription<Arc<dyn DynEvent>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Subscriber {
            name: name.to_owned(),
            tx,
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        self.inner.any.write().expect("bus lock").push(shared.clone());
        Subscription { rx, shared }
    }

    /// Publishes `event` to every subscriber without ever waiting.
    pub fn publish<E: Event>(&self, event: E) {
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        let mut closed = false;
        if let Some(sinks) = self.inner.typed.read().expect("bus lock").get(&TypeId::of::<E>()) {
            for sink in sinks {
                let subscriber = sink
                    .as_any()
                    .downcast_ref::<Subscriber<E>>()
                    .expect("subscribers are filed under their event type");
                closed |= !subscriber.offer(event.clone());
            }
        }
        {
            let any = self.inner.any.read().expect("bus lock");
            if !any.is_empty() {
                let shared: Arc<dyn DynEvent> = Arc::new(event);
                for subscriber in any.iter() {
                    closed |= !subscriber.offer(shared.clone());
                }
            }
        }
        if closed {
            self.remove_closed();
        }
    }

    fn remove_closed(&self) {
        for sinks in self.inner.typed.write().expect("bus lock").values_mut() {
            sinks.retain(|s| !s.is_closed());
        }
        self.inner.any.write().expect("bus lock").retain(|s| !s.tx.is_closed());
    }

    /// Events published so far.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Every live subscriber with its queue depth and drop count.
    pub fn subscribers(&self) -> Vec<SubscriberInfo> {
        let mut out: Vec<SubscriberInfo> = self
            .inner
            .typed
            .read()
            .expect("bus lock")
            .values()
            .flatten()
            .filter(|s| !s.is_closed())
            .map(|s| s.info())
            .collect();
        out.extend(self.inner.any.read().expect("bus lock").iter().map(|s| s.info()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct HostConnected {
        host: u32,
    }
    impl Event for HostConnected {
        fn topic(&self) -> &'static str {
            "host.connected"
        }
        fn field(&self, name: &str) -> Option<String> {
            (name == "hostUuid").then(|| self.host.to_string())
        }
    }

    #[derive(Clone, Debug)]
    struct Other;
    impl Event for Other {
        fn topic(&self) -> &'static str {
            "other"
        }
    }

    #[tokio::test]
    async fn typed_subscribers_get_their_type_only() {
        let bus = EventBus::new();
        let mut hosts = bus.subscribe::<HostConnected>("hosts", 8);
        let mut all = bus.subscribe_all("all", 8);
        bus.publish(Other);
        bus.publish(HostConnected { host: 7 });
        assert_eq!(hosts.recv().await, Some(HostConnected { host: 7 }));
        assert_eq!(hosts.try_recv(), None);
        assert_eq!(all.recv().await.unwrap().topic(), "other");
        let second = all.recv().await.unwrap();
        assert_eq!(
            second.as_any().downcast_ref::<HostConnected>(),
            Some(&HostConnected { host: 7 })
        );
    }

    #[test]
    fn a_full_subscriber_drops_and_counts_without_blocking_the_publisher() {
        let bus = EventBus::new();
        let mut slow = bus.subscribe::<HostConnected>("slow", 2);
        let mut fast = bus.subscribe::<HostConnected>("fast", 1000);
        // Nobody receives from `slow`; publishing 100 events must still return at once.
        for host in 0..100 {
            bus.publish(HostConnected { host });
        }
        assert_eq!(slow.dropped(), 98);
        assert_eq!(fast.dropped(), 0);
        assert_eq!(slow.try_recv(), Some(HostConnected { host: 0 }));
        let mut n = 0;
        while fast.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 100);
        let infos = bus.subscribers();
        let slow_info = infos.iter().find(|i| i.name == "slow").unwrap();
        assert_eq!((slow_info.dropped, slow_info.queued), (98, 1));
    }

    #[test]
    fn dropped_subscriptions_are_forgotten() {
        let bus = EventBus::new();
        let gone = bus.subscribe::<HostConnected>("gone", 1);
        drop(gone);
        bus.publish(HostConnected { host: 1 });
        assert!(bus.subscribers().is_empty());
    }

    #[test]
    fn matchers_check_topic_and_fields() {
        let event = HostConnected { host: 3 };
        assert!(EventMatcher::topic("host.connected").matches(&event));
        assert!(EventMatcher::topic("host.connected").field("hostUuid", 3).matches(&event));
        assert!(!EventMatcher::topic("host.connected").field("hostUuid", 4).matches(&event));
        assert!(!EventMatcher::topic("other").matches(&event));
    }
}
