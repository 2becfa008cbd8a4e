//! Opening the files of an OCI layout someone else wrote: only regular files are read.
//!
//! A FIFO where a blob should be blocks `open(2)` (and then `read(2)`) forever, with the
//! store lock held; a symlink to `/dev/zero` or `/dev/urandom` never ends. So every file of
//! a source layout (index, manifests, configs, layer blobs, an image tarball) is opened with
//! `O_NONBLOCK | O_NOFOLLOW` (opening a FIFO does not wait for a writer, a symlink fails with
//! `ELOOP`), then checked with `fstat(2)` on the descriptor before a byte is read.

use std::fs::File;
use std::path::Path;

use rustix::fs::{fstat, open, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::ImageError;

/// What a special file is, for messages.
fn kind_of(t: FileType) -> &'static str {
    match t {
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Socket => "a socket",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::RegularFile => "a regular file",
        FileType::Unknown => "a special file",
    }
}

/// Opens `path` for reading if, and only if, it is a regular file (not a symlink, FIFO,
/// device, socket or directory). `what` names the file in errors (`manifest blob`).
pub(crate) fn open_regular(path: &Path, what: &str) -> Result<File, ImageError> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::LOOP) => {
            return Err(ImageError::NotRegular {
                what: what.to_string(),
                path: path.to_path_buf(),
                kind: kind_of(FileType::Symlink),
            })
        }
        Err(e) => {
            return Err(ImageError::io(
                format!("open {what}"),
                path,
                std::io::Error::from(e),
            ))
        }
    };
    let stat = fstat(&fd)
        .map_err(|e| ImageError::io(format!("stat {what}"), path, std::io::Error::from(e)))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(ImageError::NotRegular {
            what: what.to_string(),
            path: path.to_path_buf(),
            kind: kind_of(kind),
        });
    }
    // O_NONBLOCK means nothing for a regular file: the reads that follow block as usual.
    Ok(File::from(fd))
}
