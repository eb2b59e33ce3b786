/*
 * vmm_interceptor.h: the interceptor plugin ABI, all a plugin author needs.
 *
 * A plugin is a shared object exporting one symbol, VMM_INTERCEPTOR_ENTRY_SYMBOL, that
 * returns a pointer to a static struct vmm_interceptor_table. The VMM calls the table's
 * functions at its two hook points:
 *
 *   pre   where a device has built a validated request, before the layers below
 *         (the next interceptors, then the backend) see it; called top to bottom;
 *   post  where the completion is forwarded back toward the guest; called bottom to top.
 *
 * Every interceptor whose pre hook ran gets its post hook for that request, exactly once.
 * Threads: create, pre, post, capacity and destroy of one instance, and its own I/O through
 * struct vmm_lower, all run on its disk's I/O thread, one call at a time. stats() may be
 * called from any thread at any time, while hooks run: what it reads must be atomic or
 * locked. The guide is docs/plugins.md.
 *
 * Rules:
 *   - Read request segments are the request's destination: a hook may write them (a cache
 *     hit fills them and returns VMM_COMPLETE). Write segments are read-only unless the
 *     request carries VMM_REQ_F_DATA_PRIVATE, which the VMM sets when the plugin declares
 *     VMM_INTERCEPTOR_F_MODIFIES_DATA: its segments are then a private bounce buffer, never
 *     guest memory, which the hook may transform in place (both directions).
 *   - Offsets and lengths are bytes, multiples of VMM_SECTOR_SIZE.
 *   - Hooks see READ, WRITE and FLUSH (no segments); the device answers GET_ID itself. A
 *     data transform transforms READ and WRITE only (kinds may be added).
 *   - Up to a queue's size of requests are in flight: pre runs at submission, post at
 *     completion, in any order, so other requests' hooks run in between. A later request
 *     that touches a 4 KiB block an earlier one in flight touches waits for it (unless both
 *     read); a flush waits for all before it, and all after it wait for the flush.
 *   - In post, a status other than VMM_STATUS_OK means the read data is not valid: do not
 *     decode or keep it.
 *   - create's err buffer is 1024 bytes; stats gets 4096 and, if it returns a length of
 *     4096 or more, one more call with that length plus one (at most 1 MiB).
 *   - Calls through struct vmm_lower are valid from create() until destroy() returns, on
 *     the thread the VMM called the plugin on. Writes made in create() reach the disk only
 *     once the instance is accepted.
 */
#ifndef VMM_INTERCEPTOR_H
#define VMM_INTERCEPTOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VMM_INTERCEPTOR_ABI_VERSION 2u
/* The oldest table version the VMM loads (a version-1 plugin runs as it always did). */
#define VMM_INTERCEPTOR_ABI_VERSION_MIN 1u
#define VMM_INTERCEPTOR_ENTRY_SYMBOL "vmm_interceptor_entry"
#define VMM_SECTOR_SIZE 512u

/* Device kinds; supported_devices in the table is a mask of (1u << kind). */
#define VMM_DEVICE_BLOCK 1u
#define VMM_DEVICE_NET 2u

/* Request kinds. */
#define VMM_REQ_READ 1u
#define VMM_REQ_WRITE 2u
#define VMM_REQ_FLUSH 3u
#define VMM_REQ_DISCARD 4u
#define VMM_REQ_GET_ID 5u
#define VMM_REQ_WRITE_ZEROES 6u
#define VMM_REQ_NET_TX 7u /* a frame from the guest to the tap: pre hooks, top to bottom */
#define VMM_REQ_NET_RX 8u /* a frame from the tap to the guest: post hooks, bottom to top */

/* Request flags. */
#define VMM_REQ_F_DATA_PRIVATE 1u /* segments are a bounce buffer the hook may modify */
#define VMM_REQ_F_DISABLED 2u     /* this instance is disabled (see F_KEEP_WHEN_DISABLED) */

/* Statuses (what the guest sees). */
#define VMM_STATUS_OK 0u
#define VMM_STATUS_IOERR 1u
#define VMM_STATUS_UNSUPP 2u
/* vmm_lower.submit: not queued, max_lower_in_flight lower requests are out (version 2). */
#define VMM_STATUS_BUSY 3u

/* What a pre hook decided. */
#define VMM_CONTINUE 0u /* pass the request to the layers below */
#define VMM_COMPLETE 1u /* satisfied here with status OK: skip the layers below */
#define VMM_FAIL 2u     /* fail the request: the guest gets an I/O error */
/* Version 2: the request waits (buffers and slot kept) until the plugin calls
 * vmm_lower.resume(ctx, req->handle, decision) with one of the three above, once. */
#define VMM_PENDING 3u

/* Table flags. */
/* The plugin transforms data: its requests carry private bounce buffers. */
#define VMM_INTERCEPTOR_F_MODIFIES_DATA 1u
/* Data on disk depends on the plugin (encryption, remapping): it stays in the path while
 * disabled, sees VMM_REQ_F_DISABLED, and must keep reading back what it wrote. A plugin
 * without this flag is skipped entirely while disabled. */
#define VMM_INTERCEPTOR_F_KEEP_WHEN_DISABLED 2u
/* What the plugin writes can only be read back through it (encryption, remapping, a
 * transform that keeps no record, like xor): the VMM never removes such an instance from a
 * running chain once it wrote, and loads one at run time only onto layers the operator
 * declares fresh. Requires VMM_INTERCEPTOR_F_KEEP_WHEN_DISABLED (the loader refuses the
 * table otherwise). */
#define VMM_INTERCEPTOR_F_OWNS_FORMAT 4u
/* The plugin handles VMM_REQ_DISCARD and VMM_REQ_WRITE_ZEROES (no segments; offset and len
 * are the range): it passes them down or answers them so that what it reads back stays
 * right (after a write-zeroes the range reads back as zeros through it). One that also
 * owns its format (VMM_INTERCEPTOR_F_OWNS_FORMAT) must answer them itself: the layers below
 * hold its layout, are not asked whether they handle them, and a CONTINUE is failed. A disk
 * offers the guest discard and write-zeroes only when every instance a discard would reach
 * (each down to the first that owns its format) declares this; they never reach an
 * instance that does not (one loaded at run time): while such an instance is in the path,
 * they are answered VMM_STATUS_UNSUPP. */
#define VMM_INTERCEPTOR_F_HANDLES_DISCARD 8u
/* A net plugin that needs each frame whole and plain (it seals or rewrites the payload): a
 * device with one in its chain negotiates no checksum or segmentation offload with the
 * guest or the tap, so every frame is at most the MTU and carries its checksums. */
#define VMM_INTERCEPTOR_F_NET_PLAIN_FRAMES 16u
/* A block plugin whose hooks may run at the same time on different threads, for different
 * requests (never two on the same 4 KiB block when either writes it: the device orders
 * those, as ever), its own I/O through vmm_lower included. A disk whose every instance
 * declares it runs pre on its hook pool (a few threads beside its I/O thread; post still
 * runs on the I/O thread), so one request's work and own I/O in pre do not hold up the
 * others of its queue. The plugin's own state then needs its own locking. Without it, calls
 * into an instance never overlap. */
#define VMM_INTERCEPTOR_F_CONCURRENT 32u

/* Log levels for vmm_lower.log. */
#define VMM_LOG_ERROR 1u
#define VMM_LOG_WARN 2u
#define VMM_LOG_INFO 3u
#define VMM_LOG_DEBUG 4u

/* One data buffer; laid out like struct iovec. */
struct vmm_segment {
    uint8_t *base;
    size_t len;
};

/* A request as interceptors see it. Owned by the VMM; valid during the call only. */
struct vmm_request {
    uint32_t kind;        /* VMM_REQ_* */
    uint32_t flags;       /* VMM_REQ_F_* */
    uint64_t offset;      /* byte offset on the device */
    uint64_t len;         /* data bytes, the sum of the segments' lengths */
    const struct vmm_segment *segments;
    uint32_t nsegments;
    uint32_t device_kind; /* VMM_DEVICE_* */
    const char *device_id; /* NUL-terminated, as in the VMM's config */
    /* The frame of a VMM_REQ_NET_TX or VMM_REQ_NET_RX; NULL for block requests (added after
     * the first ABI: block plugins built before it never read it). */
    struct vmm_net_frame *net;
    /* Version 2: this request for vmm_lower.submit and vmm_lower.resume, valid from the pre
     * hook until it is resumed or its post hook returns; NULL where it cannot wait. */
    void *handle;
};

/* struct virtio_net_hdr_v1: the offload header that travels with a frame. */
struct vmm_net_header {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

/* One Ethernet frame, in a private buffer the hook may change (net requests only). A pre
 * hook (TX) returns VMM_CONTINUE to pass the frame on, VMM_COMPLETE to take it (it goes no
 * further: dropped or answered), VMM_FAIL to drop it as an error. A post hook (RX; slot is
 * NULL, status VMM_STATUS_OK) returns VMM_STATUS_OK to pass it on, anything else to take it
 * (it goes no further). */
struct vmm_net_frame {
    uint8_t *data;     /* the frame, from its Ethernet header (no virtio header) */
    uint32_t len;      /* its length: a hook may set it from 14 to capacity */
    uint32_t capacity; /* bytes data holds */
    struct vmm_net_header header; /* keep it true if the frame changes; all zero for
                                   * VMM_INTERCEPTOR_F_NET_PLAIN_FRAMES plugins */
    void *inject_ctx;
    /* Sends frame (len bytes) back the way this one came (to the guest for TX, to the tap
     * for RX), past the other instances; returns a VMM_STATUS_*. */
    uint32_t (*inject)(void *inject_ctx, const uint8_t *frame, uint32_t len);
};

/* Version 2: a request to the layers below, queued by vmm_lower.submit. */
struct vmm_lower_io {
    uint32_t kind;  /* VMM_REQ_READ, _WRITE, _FLUSH, _DISCARD or _WRITE_ZEROES */
    uint32_t flags; /* 0 */
    uint64_t offset;
    uint64_t len;   /* the segments' total; the range for a discard or write-zeroes */
    const struct vmm_segment *segments; /* valid until done runs */
    uint32_t nsegments;
    void (*done)(void *arg, uint32_t status);
    void *arg;
};

/* "The layers below": the interceptors under this instance in its device's chain, then the
 * backend. For a plugin's own I/O (metadata, remapped blocks). Each call returns a
 * VMM_STATUS_*; offset and len must be multiples of VMM_SECTOR_SIZE within capacity. */
struct vmm_lower {
    void *ctx;
    uint32_t (*read)(void *ctx, uint64_t offset, uint8_t *buf, uint64_t len);
    uint32_t (*write)(void *ctx, uint64_t offset, const uint8_t *buf, uint64_t len);
    uint32_t (*flush)(void *ctx);
    void (*log)(void *ctx, uint32_t level, const char *message);
    uint64_t capacity; /* bytes */
    /* Discards len bytes at offset in the layers below (they read back as zeros where the
     * layers below handle it): VMM_STATUS_UNSUPP where they do not. Present only when
     * vmm_create_args.lower_features has VMM_LOWER_F_DISCARD (older VMMs: not there). */
    uint32_t (*discard)(void *ctx, uint64_t offset, uint64_t len);
    /* Version 2, present only when vmm_create_args.lower_features has VMM_LOWER_F_ASYNC:
     * queues io to the layers below on behalf of request handle; VMM_STATUS_OK (io->done
     * runs once, later, on the request's thread, never inside submit) or an error (not
     * queued; done never runs), VMM_STATUS_BUSY past max_lower_in_flight. */
    uint32_t (*submit)(void *ctx, void *handle, const struct vmm_lower_io *io);
    /* Ends the wait of a request its pre hook left VMM_PENDING: VMM_CONTINUE,
     * VMM_COMPLETE or VMM_FAIL. */
    uint32_t (*resume)(void *ctx, void *handle, uint32_t decision);
    /* Calls fire(arg, 0) after ns nanoseconds, on the instance's thread; fire(arg, 1) at
     * once when the disk drains (a reset, an edit, the shutdown). */
    uint32_t (*timer)(void *ctx, uint64_t ns, void (*fire)(void *arg, uint32_t cancelled),
                      void *arg);
};

/* vmm_create_args.lower_features */
#define VMM_LOWER_F_DISCARD 1u
#define VMM_LOWER_F_ASYNC 2u

struct vmm_create_args {
    const char *instance_id;  /* the [[interceptor]] id */
    const char *config_json;  /* the instance's config table as a JSON object */
    uint32_t device_kind;     /* VMM_DEVICE_* */
    uint32_t lower_features;  /* VMM_LOWER_F_*: what struct vmm_lower offers beyond its core */
    const char *device_id;
    const struct vmm_lower *lower; /* valid until destroy() returns */
    uint32_t max_lower_in_flight;  /* version 2: lower requests out at once, per instance */
};

struct vmm_interceptor_table {
    uint32_t abi_version;       /* VMM_INTERCEPTOR_ABI_VERSION; checked before anything else */
    uint32_t flags;             /* VMM_INTERCEPTOR_F_* */
    uint32_t supported_devices; /* mask of 1u << VMM_DEVICE_* */
    /* sizeof(struct vmm_interceptor_table) as this header declares it. The table grows at
     * its end; the VMM reads only the fields this size covers. 0 (the first tables) stands
     * for the table up to capacity. */
    uint32_t table_size;
    const char *name;           /* NUL-terminated */
    /* Returns the instance, or NULL after writing a NUL-terminated reason into err. */
    void *(*create)(const struct vmm_create_args *args, char *err, size_t err_len);
    /* Returns VMM_CONTINUE, VMM_COMPLETE or VMM_FAIL. *slot starts NULL; what the hook
     * stores there comes back to its post hook for this request. */
    uint32_t (*pre)(void *instance, const struct vmm_request *req, void **slot);
    /* status: the status from below (or VMM_STATUS_OK after a VMM_COMPLETE here).
     * Returns the status to pass up. */
    uint32_t (*post)(void *instance, const struct vmm_request *req, void *slot, uint32_t status);
    /* Writes JSON (an object) into buf, NUL-terminated if it fits; returns its length
     * without the NUL, like snprintf. May be NULL. */
    size_t (*stats)(void *instance, char *buf, size_t len);
    void (*destroy)(void *instance);
    /* Bytes the instance exposes to the layers above: at most lower->capacity, a multiple of
     * VMM_SECTOR_SIZE, or UINT64_MAX for the capacity below (as is a NULL capacity). Only
     * F_KEEP_WHEN_DISABLED plugins may expose another size. Called once, after create(). */
    uint64_t (*capacity)(void *instance);
    /* Verifies every invariant of what the instance keeps on its disk, reading all of it if
     * need be; called by `vmm-img check` (and the crash harness) with no request in flight,
     * on the thread that calls the hooks. Writes JSON like stats():
     *   {"checked": true, "problems": ["one line per broken invariant", ...],
     *    "details": {"blocks_checked": 128, ...}}
     * an empty problems array meaning clean, or {"checked": false} for a plugin that keeps
     * nothing on the disk. The VMM's buffer is 1 MiB: keep the list short (the Rust SDK
     * sends 100 lines and a count). May be NULL. */
    size_t (*check)(void *instance, char *buf, size_t len);
    /* Bytes a net plugin may add to a frame (a seal's nonce and tag): the device lowers the
     * MTU it tells the guest by the chain's sum. Present when table_size covers it. */
    uint32_t net_headroom;
    /* Version 2: takes a new config (JSON, as create's) while the instance runs, on its
     * disk's thread with nothing of the disk in flight (PATCH /interceptors/{id}). Returns
     * VMM_STATUS_OK, or another status after writing a reason into err; the instance keeps
     * its old config then. NULL: it cannot be reconfigured. */
    uint32_t (*reconfigure)(void *instance, const char *config_json, char *err, size_t err_len);
};

/* The one symbol a plugin exports. */
const struct vmm_interceptor_table *vmm_interceptor_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* VMM_INTERCEPTOR_H */
