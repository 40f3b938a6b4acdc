-- Pages on the freelist: space the incremental vacuum can hand back to the file system.
SELECT freelist_count FROM pragma_freelist_count()
