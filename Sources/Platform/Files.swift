import Foundation

// The checks and the replace step every program runs on a file it is about to write (issue 17):
// a path naming a folder is refused, never deleted; a missing or unwritable folder is named as
// such; the finished temporary file replaces the target with rename(2), which cannot remove a
// folder (rename of a file over a folder fails), so nothing that existed is lost on an error.

/// What exists at `path`: nothing, a regular file (or a link to one), or a folder.
public enum PathKind: Equatable { case missing, file, folder }

public func pathKind(_ path: String) -> PathKind {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return .missing }
    return isDir.boolValue ? .folder : .file
}

/// Throws unless `path` can be written as a file: not an existing folder, in a folder that
/// exists and is writable. `what` says what the file is for ("output", "weights").
public func checkOutputFile(_ path: String, what: String = "output file") throws {
    if path.isEmpty { throw InputError("(empty path)", "no \(what) named") }
    if pathKind(path) == .folder {
        throw InputError(path, "is a folder, not a file: give the \(what) a file name (nothing was written or removed)")
    }
    let parent = (path as NSString).deletingLastPathComponent
    let dir = parent.isEmpty ? "." : parent
    switch pathKind(dir) {
    case .missing: throw InputError(path, "the folder \(dir) does not exist (create it first)")
    case .file: throw InputError(path, "\(dir) is a file, not a folder")
    case .folder:
        guard FileManager.default.isWritableFile(atPath: dir) else {
            throw InputError(path, "the folder \(dir) is not writable")
        }
    }
}

/// Throws unless `path` names a file that can be read (not a folder, not missing).
public func checkInputFile(_ path: String, what: String = "file") throws {
    switch pathKind(path) {
    case .missing: throw InputError(path, "\(what) does not exist")
    case .folder: throw InputError(path, "is a folder; expected a \(what)")
    case .file:
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw InputError(path, "cannot be read: permission denied")
        }
    }
}

/// Throws unless `path` is a folder (`what` names it in the message).
public func checkInputFolder(_ path: String, what: String = "folder") throws {
    switch pathKind(path) {
    case .missing: throw InputError(path, "\(what) does not exist")
    case .file: throw InputError(path, "is a file, not a folder; expected a \(what)")
    case .folder: return
    }
}

/// Replaces `path` by the finished file `tmp` (same folder) with rename(2): atomic, and refusing
/// (the temporary file is removed, `path` untouched) when `path` is a folder.
public func replaceFile(_ path: String, with tmp: String) throws {
    if pathKind(path) == .folder {
        try? FileManager.default.removeItem(atPath: tmp)
        throw InputError(path, "is a folder, not a file: not replaced (nothing was removed)")
    }
    if rename(tmp, path) != 0 {
        let why = String(cString: strerror(errno))
        try? FileManager.default.removeItem(atPath: tmp)
        throw InputError(path, "cannot move the finished file \(tmp) into place: \(why)")
    }
}
