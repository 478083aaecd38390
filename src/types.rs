//! Identity types shared by every backend: executions, flows, namespaces, timestamps.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::Error;

/// Number of hash partitions a flow's keys are spread over.
pub const PARTITION_COUNT: u16 = 256;

/// Milliseconds since the Unix epoch, as stamped by the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TimestampMs(pub i64);

impl TimestampMs {
    /// Wraps a millisecond count.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self(ms)
    }

    /// Milliseconds from `earlier` to `self`: 0 when `earlier` is later, and saturating, since
    /// event times come from rows and stream entries and may be anything.
    pub fn millis_since(self, earlier: TimestampMs) -> u64 {
        self.0.saturating_sub(earlier.0).max(0) as u64
    }
}

/// Tenant or workspace scope of an execution.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Namespace(String);

impl Namespace {
    /// Wraps a namespace name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The namespace as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Namespace {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A flow (a DAG of executions). Its partition places all its executions' keys in one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FlowId(Uuid);

impl FlowId {
    /// A fresh random flow id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Wraps an existing uuid.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The flow's uuid.
    pub const fn uuid(&self) -> Uuid {
        self.0
    }

    /// The flow's partition: crc16 (XMODEM, as cluster slots use) of the uuid's 16 raw bytes,
    /// mod 256, as FlowFabric's engines compute it (so the flow's keys land in the same slots).
    pub fn partition(&self) -> u16 {
        crc16::State::<crc16::XMODEM>::calculate(self.0.as_bytes()) % PARTITION_COUNT
    }
}

impl Default for FlowId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An execution, written `{fp:N}:<uuid>` where N is its flow's partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExecutionId {
    partition: u16,
    uuid: Uuid,
}

impl ExecutionId {
    /// A fresh execution in `flow`'s partition.
    pub fn new_in(flow: &FlowId) -> Self {
        Self::from_parts(flow.partition(), Uuid::new_v4())
    }

    /// Builds an id from its partition and uuid.
    pub const fn from_parts(partition: u16, uuid: Uuid) -> Self {
        Self { partition, uuid }
    }

    /// Parses `{fp:N}:<uuid>`.
    ///
    /// # Errors
    /// [`Error::Validation`] when the text is not of that shape or N is out of range.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let invalid = || Error::validation(format!("malformed execution id {text:?}: expected {{fp:N}}:<uuid>"));
        let rest = text.strip_prefix("{fp:").ok_or_else(invalid)?;
        let (partition, uuid) = rest.split_once("}:").ok_or_else(invalid)?;
        let partition: u16 = partition.parse().map_err(|_| invalid())?;
        if partition >= PARTITION_COUNT {
            return Err(invalid());
        }
        let uuid = Uuid::parse_str(uuid).map_err(|_| invalid())?;
        Ok(Self { partition, uuid })
    }

    /// The partition index (0..256).
    pub const fn partition(&self) -> u16 {
        self.partition
    }

    /// The execution's uuid.
    pub const fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// The hash tag `{fp:N}` that keeps a flow's keys in one slot.
    pub fn hash_tag(&self) -> String {
        format!("{{fp:{}}}", self.partition)
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{fp:{}}}:{}", self.partition, self.uuid)
    }
}

impl FromStr for ExecutionId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ExecutionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ExecutionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Defines a textual id: a newtype over `String` with `new`, `as_str`, `Display` and `From<&str>`.
macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub struct $name(String);

        impl $name {
            /// Wraps the id's text.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_id!(
    /// One lease of an execution by a worker: a new id at each claim.
    LeaseId
);
text_id!(
    /// A worker process (the `worker` argument of a claim).
    WorkerInstanceId
);
text_id!(
    /// A signal, as its sender names it.
    SignalId
);
text_id!(
    /// A point where a suspended execution waits for a signal.
    WaitpointId
);

/// The longest group name, member id or subscriber name, in characters.
pub(crate) const MAX_NAME_CHARS: usize = 64;

/// Checks a name the backend stores or a metrics label carries (a group name, a member id, a
/// subscriber name): 1 to 64 characters, no control characters (NUL included).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(Error::validation(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn millis_since_is_never_negative_and_never_overflows() {
        assert_eq!(TimestampMs(1_000).millis_since(TimestampMs(400)), 600);
        assert_eq!(TimestampMs(1_000).millis_since(TimestampMs(5_000)), 0, "an event from the future has no lag");
        let now = TimestampMs::now();
        assert_eq!(now.millis_since(TimestampMs(i64::MIN)), i64::MAX as u64);
        assert_eq!(now.millis_since(TimestampMs(i64::MAX)), 0);
        assert_eq!(TimestampMs(i64::MIN).millis_since(TimestampMs(i64::MAX)), 0);
        assert_eq!(TimestampMs(i64::MAX).millis_since(TimestampMs(i64::MIN)), i64::MAX as u64);
    }

    use super::*;

    #[test]
    fn text_ids_keep_their_text() {
        assert_eq!(LeaseId::new("l-1").as_str(), "l-1");
        assert_eq!(WorkerInstanceId::from("w-1").to_string(), "w-1");
        assert_eq!(SignalId::from(String::from("s")), SignalId::new("s"));
        assert_eq!(WaitpointId::new("wp").as_str(), "wp");
    }

    #[test]
    fn execution_id_round_trips_through_text() {
        let flow = FlowId::new();
        let id = ExecutionId::new_in(&flow);
        assert_eq!(id.partition(), flow.partition());
        assert_eq!(ExecutionId::parse(&id.to_string()).ok(), Some(id));
    }

    #[test]
    fn malformed_execution_ids_are_validation_errors() {
        for bad in ["", "fp:1:x", "{fp:999}:00000000-0000-0000-0000-000000000000", "{fp:1}:nope", "{fp:-1}:x"] {
            assert!(matches!(ExecutionId::parse(bad), Err(Error::Validation { .. })), "{bad}");
        }
    }

    /// Known vectors: crc16-XMODEM of the uuid's 16 raw bytes, mod 256, as FlowFabric computes
    /// it (the first two are FlowFabric's own; the text form would give 16 and 61).
    #[test]
    fn flow_partition_is_crc16_xmodem_of_the_uuid_bytes_mod_256() {
        let partition =
            |text: &str| FlowId::from_uuid(Uuid::parse_str(text).unwrap_or_else(|e| panic!("{e}"))).partition();
        assert_eq!(partition("11111111-1111-4111-8111-111111111111"), 191);
        assert_eq!(partition("6f9619ff-8b86-d011-b42d-00c04fc964ff"), 5);
        // crc16 0x0000, 0x6c89, 0x0041.
        assert_eq!(partition("00000000-0000-0000-0000-000000000000"), 0);
        assert_eq!(partition("123e4567-e89b-12d3-a456-426614174000"), 0x89);
        assert_eq!(partition("ffffffff-ffff-ffff-ffff-ffffffffffff"), 0x41);
    }

    /// The wire text of an execution id: `{fp:N}:<hyphenated lower-case uuid>`.
    #[test]
    fn execution_id_text_form_is_pinned() {
        let uuid = Uuid::parse_str("123e4567-e89b-12d3-a456-426614174000").unwrap_or_else(|e| panic!("{e}"));
        let id = ExecutionId::from_parts(224, uuid);
        assert_eq!(id.to_string(), "{fp:224}:123e4567-e89b-12d3-a456-426614174000");
        assert_eq!(id.hash_tag(), "{fp:224}");
        assert_eq!(
            ExecutionId::parse("{fp:0}:00000000-0000-0000-0000-000000000000").ok(),
            Some(ExecutionId::from_parts(0, Uuid::nil()))
        );
        assert_eq!(
            serde_json::to_string(&id).ok().as_deref(),
            Some("\"{fp:224}:123e4567-e89b-12d3-a456-426614174000\"")
        );
        let flow = FlowId::from_uuid(uuid);
        assert_eq!(ExecutionId::new_in(&flow).partition(), 137, "a flow's executions share its partition");
    }
}
