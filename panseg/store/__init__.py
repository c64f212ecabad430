"""The preprocessed store, pure (no Ray): Zarr v3 arrays per case and a Parquet manifest.

- `zarr_store`: create, write and read the store, its cases and its manifest (atomic case writes)
- `shard_reader`: fast box reads from the store's own shard layout, without zarr-python

What `panseg.store` exported when it was one module is re-exported here, so
`from panseg.store import read_case` keeps working.
"""

from panseg.store.zarr_store import (CASES, MANIFEST, MANIFEST_SCHEMA, STAGING, STATUSES, STORE_FORMAT,
                                     STORE_FORMAT_VERSION, StoredCase, StoreError, StoreLike, case_attrs,
                                     case_manifest_row, clean_staging, create_store, failed_row, list_complete_cases,
                                     local_path, manifest_row, open_case, open_store, read_case,
                                     read_case_manifest_row, read_locations, read_manifest, read_patch,
                                     read_store_config, write_case, write_manifest)

__all__ = ["CASES", "MANIFEST", "MANIFEST_SCHEMA", "STAGING", "STATUSES", "STORE_FORMAT", "STORE_FORMAT_VERSION",
           "StoreError", "StoreLike", "StoredCase", "case_attrs", "case_manifest_row", "clean_staging", "create_store",
           "failed_row", "list_complete_cases", "local_path", "manifest_row", "open_case", "open_store", "read_case",
           "read_case_manifest_row", "read_locations", "read_manifest", "read_patch", "read_store_config",
           "write_case", "write_manifest"]
