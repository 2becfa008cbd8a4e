//! The parsed, validated shape of a unit. Everything here is plain data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::names::{Capability, NetworkMode, PullPolicy, RlimitResource};

/// A loaded unit: its name, where it came from, and its four sections.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// Full unit name: the file stem, e.g. `web` or `getty@tty1` (never the `.toml` suffix).
    pub name: String,
    /// File the unit was read from, if any (units loaded over the API have none).
    pub path: Option<PathBuf>,
    /// The TOML text as written (before specifier expansion); used by `cat` and change detection.
    pub source: String,
    /// `[unit]`: description and dependencies.
    pub unit: UnitSection,
    /// `[container]`: what to run.
    pub container: ContainerSection,
    /// `[service]`: lifecycle, restart policy and resource limits.
    pub service: ServiceSection,
    /// `[fleet]`: cluster placement rules (used by fleetd).
    pub fleet: FleetSection,
}

/// `[unit]` section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitSection {
    /// Human description shown by `unitctl list`.
    pub description: Option<String>,
    /// Units that must be active for this one to start; if one is missing or fails, this one fails.
    pub requires: Vec<String>,
    /// Units started along with this one; their failure does not affect it.
    pub wants: Vec<String>,
    /// This unit starts only after these have finished starting (ordering only).
    pub after: Vec<String>,
    /// These units start only after this one has finished starting (ordering only).
    pub before: Vec<String>,
}

/// `[container]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSection {
    /// Image name (`name` or `name:tag`); `None` runs on the host's root, read-only.
    pub image: Option<String>,
    /// `pull`: when the manager pulls `image` from its registry (meaningful only when
    /// `image` is a registry reference, see [`ContainerSection::registry_image`]).
    pub pull: PullPolicy,
    /// argv; never empty after validation.
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute).
    pub workdir: Option<PathBuf>,
    /// `user` or `user:group` or numeric `uid[:gid]`.
    pub user: Option<String>,
    /// Network mode.
    pub network: NetworkMode,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// Hostname inside the container.
    pub hostname: Option<String>,
    /// Run a minimal init as pid 1 of the container that reaps zombies and forwards
    /// signals to the command (default true: a command as pid 1 ignores SIGTERM unless it
    /// installs a handler, and reaps nothing).
    pub init: bool,
    /// The capabilities the container keeps; `None`: the runtime's default set (like runc's).
    pub capabilities: Option<Vec<Capability>>,
    /// Mount the image's root read-only (no upper dir); declared mounts stay writable.
    pub read_only: bool,
    /// Resource limits (setrlimit) for the command.
    pub rlimits: Vec<Rlimit>,
    /// Run in a user namespace with this id mapping (uids and gids alike).
    pub user_namespace: Option<IdMap>,
    /// `control_api`: the unit may use the control sockets (the manager's D-Bus API and
    /// fleetd's Unix socket). Without it both refuse callers from the unit's cgroup, and the
    /// manager refuses to start the unit with a bind mount that exposes a control socket.
    pub control_api: bool,
    /// Devices the container may use beyond the standard `/dev` nodes.
    pub devices: Vec<Device>,
}

/// A device a unit asks for (`[container] devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A host device node (absolute path under `/dev`): allowed read-write and made available
    /// at the same path in the container (like `docker run --device`).
    Path(PathBuf),
    /// An allow rule `c|b MAJOR|*:MINOR|* [r][w][m]` (like Docker's `--device-cgroup-rule`).
    Rule(DeviceRule),
}

/// Character or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// `c`
    Char,
    /// `b`
    Block,
}

/// An allow rule for devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    /// Character or block.
    pub kind: DeviceKind,
    /// Major number; `None` (`*`): any.
    pub major: Option<u32>,
    /// Minor number; `None` (`*`): any.
    pub minor: Option<u32>,
    /// `r`: open for reading.
    pub read: bool,
    /// `w`: open for writing.
    pub write: bool,
    /// `m`: create nodes (mknod; the container also needs `MKNOD` in `capabilities`).
    pub mknod: bool,
}

/// One resource limit (setrlimit(2)), as the unit gives it and the container runtime sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: RlimitResource,
    /// Soft limit (`u64::MAX`: unlimited).
    pub soft: u64,
    /// Hard limit (`u64::MAX`: unlimited).
    pub hard: u64,
}

/// A user-namespace id mapping: container ids `container_id..+size` are host ids
/// `host_id..+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First id inside the container.
    pub container_id: u32,
    /// First id on the host.
    pub host_id: u32,
    /// Number of ids.
    pub size: u32,
}

impl ContainerSection {
    /// `image` when it names a registry (`host[:port]/repo...`: a first path component with
    /// a `.` or a `:`, or `localhost`), decided by its spelling only; short names resolved
    /// through a default registry are the pull helper's business.
    pub fn registry_image(&self) -> Option<&str> {
        let image = self.image.as_deref()?;
        let (host, rest) = image.split_once('/')?;
        let named = host.contains('.') || host.contains(':') || host == "localhost";
        (named && !rest.is_empty()).then_some(image)
    }
}

impl Default for ContainerSection {
    fn default() -> Self {
        Self {
            image: None,
            pull: PullPolicy::Missing,
            command: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            network: NetworkMode::Host,
            mounts: Vec::new(),
            hostname: None,
            init: true,
            capabilities: None,
            read_only: false,
            rlimits: Vec::new(),
            user_namespace: None,
            control_api: false,
            devices: Vec::new(),
        }
    }
}

/// One bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path on the host.
    pub host: PathBuf,
    /// Absolute path inside the container.
    pub path: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
    /// Create the host directory (and its parents, mode 0755) if it does not exist, as
    /// Kubernetes' `hostPath` type `DirectoryOrCreate`; otherwise a missing host path fails
    /// the start.
    pub create: bool,
}

/// How the manager treats the main process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// Active as soon as the process runs.
    #[default]
    Simple,
    /// Runs to completion; units ordered after it start only once it exited 0.
    Oneshot,
}

/// When to restart a unit whose main process exited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never.
    #[default]
    No,
    /// After a non-zero exit or death by signal.
    OnFailure,
    /// After any exit.
    Always,
}

/// CPU bandwidth limit in cgroup v2 `cpu.max` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    /// Microseconds of CPU time allowed per period.
    pub quota_us: u64,
    /// Period length in microseconds.
    pub period_us: u64,
}

/// `[service]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSection {
    /// `type`: simple or oneshot.
    pub kind: ServiceType,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// First delay before a restart; doubled on each consecutive restart.
    pub restart_sec: Duration,
    /// Upper bound for the doubled restart delay.
    pub restart_max_sec: Duration,
    /// Time between SIGTERM and SIGKILL on stop.
    pub stop_timeout: Duration,
    /// At most this many starts within `start_limit_interval`; one more marks the unit failed.
    pub start_limit_burst: u32,
    /// Window for `start_limit_burst`.
    pub start_limit_interval: Duration,
    /// cgroup `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// cgroup `cpu.max`.
    pub cpu_max: Option<CpuMax>,
    /// cgroup `pids.max`.
    pub pids_max: Option<u64>,
}

impl Default for ServiceSection {
    fn default() -> Self {
        Self {
            kind: ServiceType::Simple,
            restart: RestartPolicy::No,
            restart_sec: Duration::from_millis(100),
            restart_max_sec: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            start_limit_burst: 5,
            start_limit_interval: Duration::from_secs(10),
            memory_max: None,
            cpu_max: None,
            pids_max: None,
        }
    }
}

/// One `machine_metadata` rule: `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRule {
    /// Metadata key.
    pub key: String,
    /// Required value.
    pub value: String,
}

/// `[fleet]` section: where in a cluster the unit may run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSection {
    /// Run only on the machine with this id.
    pub machine_id: Option<String>,
    /// Run on the machine where these units run.
    pub machine_of: Vec<String>,
    /// Machine metadata requirements: different keys AND, values of one key OR.
    pub machine_metadata: Vec<MetadataRule>,
    /// Never share a machine with units matching these globs (applied both ways).
    pub conflicts: Vec<String>,
    /// Run on every matching machine.
    pub global: bool,
    /// Take the machine of these units, which are moved away.
    pub replaces: Vec<String>,
}
