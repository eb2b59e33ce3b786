/*
 * xor: an example interceptor in C, built from vmm_interceptor.h alone.
 *
 * It XORs every data byte with a key byte on the way to the disk and again on the way
 * back, so the disk holds transformed bytes and the guest sees its own. It declares
 * MODIFIES_DATA (so it works on private bounce buffers, never on guest memory) and
 * KEEP_WHEN_DISABLED: it keeps no record of which sectors it wrote, so to keep them
 * readable it goes on XORing while disabled.
 *
 * Config: { key = 0..255 } (default 0x5a).
 * Build:  cc -shared -fPIC -O2 -Wall -Wextra -I interceptors/include \
 *            interceptors/xor/xor.c -o libxor.so
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vmm_interceptor.h>

struct xor_instance {
    uint8_t key;
    /* Written by the I/O thread, read by stats() from other threads: atomic. */
    atomic_uint_least64_t requests;
    atomic_uint_least64_t bytes;
};

/* Finds "key": <number> in the instance's JSON config. */
static int parse_key(const char *json, uint8_t *key, char *err, size_t err_len)
{
    const char *p = json ? strstr(json, "\"key\"") : NULL;
    char *end;
    long v;

    *key = 0x5a;
    if (p == NULL)
        return 0;
    p = strchr(p + 5, ':');
    if (p == NULL) {
        snprintf(err, err_len, "config: key has no value");
        return -1;
    }
    v = strtol(p + 1, &end, 10);
    if (end == p + 1 || v < 0 || v > 255) {
        snprintf(err, err_len, "config: key must be a number from 0 to 255");
        return -1;
    }
    *key = (uint8_t)v;
    return 0;
}

static void *xor_create(const struct vmm_create_args *args, char *err, size_t err_len)
{
    struct xor_instance *x;
    uint8_t key;

    if (parse_key(args->config_json, &key, err, err_len) != 0)
        return NULL;
    x = calloc(1, sizeof(*x));
    if (x == NULL) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    x->key = key;
    return x;
}

static void xor_data(const struct xor_instance *x, const struct vmm_request *req)
{
    for (uint32_t i = 0; i < req->nsegments; i++) {
        uint8_t *p = req->segments[i].base;
        for (size_t j = 0; j < req->segments[i].len; j++)
            p[j] ^= x->key;
    }
}

static uint32_t xor_pre(void *instance, const struct vmm_request *req, void **slot)
{
    struct xor_instance *x = instance;

    (void)slot;
    if (req->kind != VMM_REQ_WRITE)
        return VMM_CONTINUE;
    if (!(req->flags & VMM_REQ_F_DATA_PRIVATE))
        return VMM_FAIL; /* never transform the guest's own memory */
    xor_data(x, req);
    atomic_fetch_add_explicit(&x->requests, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&x->bytes, req->len, memory_order_relaxed);
    return VMM_CONTINUE;
}

static uint32_t xor_post(void *instance, const struct vmm_request *req, void *slot,
                         uint32_t status)
{
    struct xor_instance *x = instance;

    (void)slot;
    if (req->kind != VMM_REQ_READ || status != VMM_STATUS_OK)
        return status;
    if (!(req->flags & VMM_REQ_F_DATA_PRIVATE))
        return VMM_STATUS_IOERR;
    xor_data(x, req);
    atomic_fetch_add_explicit(&x->requests, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&x->bytes, req->len, memory_order_relaxed);
    return status;
}

static size_t xor_stats(void *instance, char *buf, size_t len)
{
    struct xor_instance *x = instance;
    unsigned long long requests = atomic_load_explicit(&x->requests, memory_order_relaxed);
    unsigned long long bytes = atomic_load_explicit(&x->bytes, memory_order_relaxed);
    int n = snprintf(buf, len, "{\"key\":%u,\"requests\":%llu,\"bytes\":%llu}", x->key,
                     requests, bytes);
    return n < 0 ? 0 : (size_t)n;
}

static void xor_destroy(void *instance)
{
    free(instance);
}

static const struct vmm_interceptor_table table = {
    .abi_version = VMM_INTERCEPTOR_ABI_VERSION,
    .flags = VMM_INTERCEPTOR_F_MODIFIES_DATA | VMM_INTERCEPTOR_F_KEEP_WHEN_DISABLED |
             VMM_INTERCEPTOR_F_OWNS_FORMAT,
    .supported_devices = 1u << VMM_DEVICE_BLOCK,
    .table_size = sizeof(struct vmm_interceptor_table),
    .name = "xor",
    .create = xor_create,
    .pre = xor_pre,
    .post = xor_post,
    .stats = xor_stats,
    .destroy = xor_destroy,
    .capacity = NULL,
    .check = NULL,
};

const struct vmm_interceptor_table *vmm_interceptor_entry(void)
{
    return &table;
}
