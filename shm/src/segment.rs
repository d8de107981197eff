//! The shared file and its header. Layout (little-endian, offsets in bytes):
//!
//! ```text
//! 0     magic "EPSHMRG1"            8   version u32 (1)        12  reserved
//! 16    nonce, 16 random bytes      32  ring_bytes u64         40  closed u32 (0 open, 1 closed)
//! 256   request ring control        512 response ring control (layout in ring.rs)
//! 4096  request ring data, ring_bytes
//! 4096 + ring_bytes   response ring data, ring_bytes
//! ```
//!
//! The file is `ring_bytes * 2 + 4096` bytes long; tmpfs allocates its pages as they are first
//! written, so an idle link costs address space, not memory.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::errors::ShmError;
use crate::futex;
use crate::ring::{self, Consumer, Producer};

const MAGIC: [u8; 8] = *b"EPSHMRG1";
const VERSION: u32 = 1;
const OFF_VERSION: usize = 8;
const OFF_NONCE: usize = 16;
const OFF_RING_BYTES: usize = 32;
const OFF_CLOSED: usize = 40;
/// Where each ring's control block starts (its positions and futex words).
const OFF_RING_CONTROL: [usize; 2] = [256, 512];
pub(crate) const HEADER_BYTES: usize = 4096;
const NAME_PREFIX: &str = "epserve-shm-";
const MIN_RING: usize = 4096;
const MAX_RING: usize = 1 << 30;

/// Where segments are created when nothing else is configured.
pub fn default_dir() -> PathBuf {
    PathBuf::from("/dev/shm")
}

/// The secret the creator writes in the header and tells the attaching side over the
/// authenticated control link: attaching needs both the file and this value.
#[derive(Clone, PartialEq, Eq)]
pub struct Nonce([u8; 16]);

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nonce(..)")
    }
}

impl Nonce {
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Nonce> {
        let bytes = unhex(s)?;
        Some(Nonce(bytes.try_into().ok()?))
    }

    /// Compares without stopping at the first differing byte.
    fn matches(&self, other: &[u8]) -> bool {
        other.len() == self.0.len() && self.0.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

fn random<const N: usize>() -> Result<[u8; N], ShmError> {
    let path = PathBuf::from("/dev/urandom");
    let mut out = [0u8; N];
    File::open(&path).and_then(|mut f| f.read_exact(&mut out)).map_err(|source| ShmError::Io { path, source })?;
    Ok(out)
}

/// Which side of the segment this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Created the file; produces requests, consumes responses.
    Creator,
    /// Attached by name and nonce; consumes requests, produces responses.
    Attacher,
}

/// A mapped segment. The creator's removes its file when dropped (if [`Segment::unlink`] did not
/// already); the mapping itself lasts until the last ring end is dropped.
#[derive(Debug)]
pub struct Segment {
    map: MmapRaw,
    ring_bytes: usize,
    path: PathBuf,
    name: String,
    nonce: Nonce,
    role: Role,
}

impl Segment {
    /// Creates a new segment file in `dir` with two rings of `ring_bytes` each: random name, mode
    /// 0600, never an existing file or a symlink.
    pub fn create(dir: &Path, ring_bytes: usize) -> Result<Arc<Segment>, ShmError> {
        if !ring_bytes.is_multiple_of(8) || !(MIN_RING..=MAX_RING).contains(&ring_bytes) {
            return Err(ShmError::RingSize(ring_bytes));
        }
        let name = format!("{NAME_PREFIX}{}", hex(&random::<16>()?));
        let nonce = Nonce(random::<16>()?);
        let path = dir.join(&name);
        let io = |source| ShmError::Io { path: path.clone(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let total = HEADER_BYTES + 2 * ring_bytes;
        // The file's blocks are reserved now, not on first touch: a tmpfs too small for the rings
        // (a container's 64 MiB /dev/shm) fails here with ENOSPC — and `auto` falls back to gRPC —
        // instead of killing the process with SIGBUS when a ring first writes past what it holds.
        let reserve = || {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for writing for the duration of the call.
            match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) } {
                0 => Ok(()),
                errno => Err(std::io::Error::from_raw_os_error(errno)),
            }
        };
        let mapped = reserve().and_then(|()| MmapOptions::new().len(total).map_raw(&file));
        let map = match mapped {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(io(e));
            }
        };
        let segment = Segment { map, ring_bytes, path, name, nonce, role: Role::Creator };
        // The file is new and zero-filled: positions, sequence words and `closed` start at 0.
        segment.write_bytes(0, &MAGIC);
        segment.write_bytes(OFF_VERSION, &VERSION.to_le_bytes());
        segment.write_bytes(OFF_NONCE, &segment.nonce.0);
        segment.write_bytes(OFF_RING_BYTES, &(ring_bytes as u64).to_le_bytes());
        Ok(Arc::new(segment))
    }

    /// Maps the segment `name` in `dir` if it is ours to use: a name of the form the creator
    /// gives, a regular file (not a symlink) owned by this user with no access for group or
    /// others, a header of this version describing exactly this file, and the same nonce.
    pub fn attach(dir: &Path, name: &str, nonce: &Nonce) -> Result<Arc<Segment>, ShmError> {
        let path = dir.join(name);
        let refused = |reason: String| ShmError::Refused { path: path.clone(), reason };
        let suffix = name.strip_prefix(NAME_PREFIX).unwrap_or_default();
        if suffix.len() != 32 || unhex(suffix).is_none() {
            return Err(refused("not a segment name".into()));
        }
        let io = |source| ShmError::Io { path: path.clone(), source };
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(refused("not a regular file".into()));
        }
        let uid = rustix::process::getuid().as_raw();
        if meta.uid() != uid {
            return Err(refused(format!("owned by uid {}, this process runs as uid {uid}", meta.uid())));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(refused(format!("mode {:o} gives access to group or others", meta.mode() & 0o777)));
        }
        let len = meta.len();
        if len < HEADER_BYTES as u64 || len > (HEADER_BYTES + 2 * MAX_RING) as u64 {
            return Err(refused(format!("{len} bytes long")));
        }
        let map = MmapOptions::new().len(len as usize).map_raw(&file).map_err(io)?;
        let mut segment = Segment {
            map,
            ring_bytes: 0,
            path: path.clone(),
            name: name.to_owned(),
            nonce: nonce.clone(),
            role: Role::Attacher,
        };
        let mut header = [0u8; 48];
        segment.read_bytes(0, &mut header);
        if header[..8] != MAGIC {
            return Err(refused("no segment header (bad magic)".into()));
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != VERSION {
            return Err(refused(format!("header version {version}, this build reads {VERSION}")));
        }
        if !nonce.matches(&header[OFF_NONCE..OFF_NONCE + 16]) {
            return Err(refused("the nonce does not match".into()));
        }
        let mut ring = [0u8; 8];
        ring.copy_from_slice(&header[OFF_RING_BYTES..OFF_RING_BYTES + 8]);
        let ring_bytes = u64::from_le_bytes(ring);
        if !ring_bytes.is_multiple_of(8)
            || !(MIN_RING as u64..=MAX_RING as u64).contains(&ring_bytes)
            || HEADER_BYTES as u64 + 2 * ring_bytes != len
        {
            return Err(refused(format!("the header's ring size {ring_bytes} does not match a {len}-byte file")));
        }
        segment.ring_bytes = ring_bytes as usize;
        Ok(Arc::new(segment))
    }

    /// The file name (no directory): what the attaching side is told.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn nonce(&self) -> &Nonce {
        &self.nonce
    }

    /// Bytes of each ring.
    pub fn ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    /// Removes the file (creator only; the mappings stay valid). Once both sides have mapped it,
    /// nothing needs the name any more, and a crash can no longer leave it behind.
    pub fn unlink(&self) -> Result<(), ShmError> {
        if self.role != Role::Creator {
            return Ok(());
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ShmError::Io { path: self.path.clone(), source }),
        }
    }

    /// This side's ends of the two rings. Call once per side: each ring has one producer and one
    /// consumer, and the ends assume they are the only ones.
    pub fn ends(self: &Arc<Self>, role: Role) -> (Producer, Consumer) {
        let (send, receive) = match role {
            Role::Creator => (0, 1),
            Role::Attacher => (1, 0),
        };
        (Producer::new(self.clone(), send), Consumer::new(self.clone(), receive))
    }

    /// Marks the segment closed for both sides and wakes whoever sleeps on it.
    pub fn close(&self) {
        self.closed_word().store(1, Ordering::SeqCst);
        for r in 0..2 {
            for word in [ring::DATA_SEQ, ring::SPACE_SEQ] {
                let w = self.ring_u32(r, word);
                w.fetch_add(1, Ordering::SeqCst);
                futex::wake_all(w);
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed_word().load(Ordering::Acquire) != 0
    }

    fn closed_word(&self) -> &AtomicU32 {
        self.u32_at(OFF_CLOSED)
    }

    /// A 64-bit word of ring `r`'s control block.
    pub(crate) fn ring_u64(&self, r: usize, offset: usize) -> &AtomicU64 {
        let at = OFF_RING_CONTROL[r] + offset;
        assert!(at.is_multiple_of(8) && at + 8 <= HEADER_BYTES, "control word offsets are constants");
        // SAFETY: `at` is 8-aligned (the mapping is page-aligned) and inside the header, which
        // every mapping of a segment covers; the reference lives no longer than `self` and thus
        // the mapping. Both processes only ever access these words atomically.
        unsafe { &*(self.map.as_mut_ptr().add(at) as *const AtomicU64) }
    }

    /// A 32-bit (futex) word of ring `r`'s control block.
    pub(crate) fn ring_u32(&self, r: usize, offset: usize) -> &AtomicU32 {
        self.u32_at(OFF_RING_CONTROL[r] + offset)
    }

    fn u32_at(&self, at: usize) -> &AtomicU32 {
        assert!(at.is_multiple_of(4) && at + 4 <= HEADER_BYTES, "control word offsets are constants");
        // SAFETY: as in `ring_u64`, for a 4-aligned word of the header.
        unsafe { &*(self.map.as_mut_ptr().add(at) as *const AtomicU32) }
    }

    /// Where ring `r`'s data starts in the mapping.
    pub(crate) fn data_start(&self, r: usize) -> usize {
        HEADER_BYTES + r * self.ring_bytes
    }

    /// Copies `src` into the mapping at `at`. Out-of-range copies are a bug of this crate (every
    /// caller reduces positions modulo the ring size first), so they panic rather than corrupt.
    pub(crate) fn write_bytes(&self, at: usize, src: &[u8]) {
        assert!(at.checked_add(src.len()).is_some_and(|end| end <= self.map.len()), "write inside the mapping");
        // SAFETY: the range is inside the mapping (checked above), which lives as long as `self`;
        // `src` is process-private memory, so the ranges cannot overlap. The ring protocol gives
        // this range to this side alone; a misbehaving peer writing it concurrently can only make
        // the bytes garbage, which the receiver validates.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(at), src.len()) }
    }

    /// Copies from the mapping at `at` into `dst`; same contract as [`Self::write_bytes`].
    pub(crate) fn read_bytes(&self, at: usize, dst: &mut [u8]) {
        assert!(at.checked_add(dst.len()).is_some_and(|end| end <= self.map.len()), "read inside the mapping");
        // SAFETY: as in `write_bytes`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(at), dst.as_mut_ptr(), dst.len()) }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = self.unlink();
    }
}
