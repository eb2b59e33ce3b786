/* rawsend: sends COUNT hand-made Ethernet frames of one shape out of a network interface
 * through an AF_PACKET socket, bypassing the guest's own stack: VLAN tag stacks and IPv6
 * extension headers that no socket of the stack would send, and source addresses that are
 * not the interface's. The guest's init runs it for the `rawsend=` task (net-filter's
 * tests in the lab, tests/lab/tests/net_filter.rs).
 *
 *   rawsend IFACE SHAPE SRC DST DSTMAC DPORT COUNT SPORT
 *
 * SHAPE is words joined by '-', outermost first, the last one `tcp` (a SYN) or `udp` (8
 * bytes of payload, "rawsend\n"):
 *   q       an 802.1Q tag (TPID 0x8100), VLAN 0
 *   ad      an 802.1ad tag (TPID 0x88a8), VLAN 0
 *   dstopt  an IPv6 destination options header (one PadN option)
 *   frag    an IPv6 fragment header, offset 0 and no more fragments (an atomic fragment:
 *           the receiver reads the datagram whole)
 * e.g. `q-q-tcp`, `ad-udp`, `dstopt-tcp`, `tcp`. SRC and DST are both IPv4 or both IPv6
 * (then the frame is IPv6); SRC may be any address (a forged one too). The source MAC is
 * the interface's. Frame i (0 <= i < COUNT) goes from port SPORT + i, 50 ms after the one
 * before. Every checksum is computed (no offload).
 *
 * Prints `sent=N sport=SPORT frame_bytes=B` and exits 0 when all COUNT frames were sent;
 * exits 1 with a message on stderr otherwise, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TAGS 4
#define MAX_EXT 4
#define FRAME_MAX 256

struct shape {
    uint16_t tags[MAX_TAGS];
    int ntags;
    uint8_t ext[MAX_EXT]; /* IPv6 next-header values: 60 destination options, 44 fragment */
    int next;
    int proto; /* 6 TCP, 17 UDP */
};

static int usage(const char *why)
{
    fprintf(stderr, "rawsend: %s\nusage: rawsend IFACE SHAPE SRC DST DSTMAC DPORT COUNT SPORT\n", why);
    return 2;
}

static int parse_shape(const char *text, struct shape *s)
{
    char buf[128];
    memset(s, 0, sizeof(*s));
    if (strlen(text) >= sizeof(buf))
        return -1;
    strcpy(buf, text);
    char *save = NULL;
    for (char *w = strtok_r(buf, "-", &save); w; w = strtok_r(NULL, "-", &save)) {
        if (s->proto)
            return -1; /* words after tcp/udp */
        if (!strcmp(w, "q") || !strcmp(w, "ad")) {
            if (s->ntags == MAX_TAGS || s->next)
                return -1;
            s->tags[s->ntags++] = w[0] == 'q' ? 0x8100 : 0x88a8;
        } else if (!strcmp(w, "dstopt") || !strcmp(w, "frag")) {
            if (s->next == MAX_EXT)
                return -1;
            s->ext[s->next++] = w[0] == 'd' ? 60 : 44;
        } else if (!strcmp(w, "tcp")) {
            s->proto = 6;
        } else if (!strcmp(w, "udp")) {
            s->proto = 17;
        } else {
            return -1;
        }
    }
    return s->proto ? 0 : -1;
}

static int parse_mac(const char *text, uint8_t mac[6])
{
    unsigned int b[6];
    char tail;
    if (sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &tail) != 6)
        return -1;
    for (int i = 0; i < 6; i++)
        mac[i] = (uint8_t)b[i];
    return 0;
}

static int parse_uint(const char *text, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (errno || end == text || *end || v > max)
        return -1;
    *out = v;
    return 0;
}

/* One's-complement sum of `len` bytes, added to `sum`. */
static uint32_t sum16(uint32_t sum, const uint8_t *p, size_t len)
{
    for (size_t i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        sum += (uint32_t)(p[len - 1] << 8);
    return sum;
}

static uint16_t fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

/* Builds frame `i` into `f`; returns its length. */
static size_t build(uint8_t *f, const struct shape *s, int v6, const uint8_t *src, const uint8_t *dst,
                    const uint8_t dmac[6], const uint8_t smac[6], uint16_t sport, uint16_t dport, uint32_t i)
{
    static const uint8_t udp_payload[8] = "rawsend\n";
    size_t n = 0;
    memcpy(f, dmac, 6);
    memcpy(f + 6, smac, 6);
    n = 12;
    for (int t = 0; t < s->ntags; t++) {
        put16(f + n, s->tags[t]);
        put16(f + n + 2, 0); /* priority 0, VLAN 0 */
        n += 4;
    }
    put16(f + n, v6 ? 0x86dd : 0x0800);
    n += 2;

    size_t l4len = s->proto == 6 ? 20 : 8 + sizeof(udp_payload);
    size_t ip = n, l4;
    if (v6) {
        size_t extlen = (size_t)s->next * 8;
        put32(f + ip, 0x60000000);
        put16(f + ip + 4, (uint16_t)(extlen + l4len));
        f[ip + 6] = s->next ? s->ext[0] : (uint8_t)s->proto;
        f[ip + 7] = 64;
        memcpy(f + ip + 8, src, 16);
        memcpy(f + ip + 24, dst, 16);
        size_t e = ip + 40;
        for (int k = 0; k < s->next; k++, e += 8) {
            uint8_t next = k + 1 < s->next ? s->ext[k + 1] : (uint8_t)s->proto;
            memset(f + e, 0, 8);
            f[e] = next;
            if (s->ext[k] == 60) {
                f[e + 1] = 0; /* 8 bytes in all */
                f[e + 2] = 1; /* PadN */
                f[e + 3] = 4; /* of 4 bytes */
            } else {
                /* reserved 0, offset 0, M 0, identification */
                put32(f + e + 4, 0x52570000u + i);
            }
        }
        l4 = e;
    } else {
        memset(f + ip, 0, 20);
        f[ip] = 0x45;
        put16(f + ip + 2, (uint16_t)(20 + l4len));
        put16(f + ip + 4, (uint16_t)(0x5200 + i)); /* identification */
        put16(f + ip + 6, 0x4000);                 /* don't fragment */
        f[ip + 8] = 64;
        f[ip + 9] = (uint8_t)s->proto;
        memcpy(f + ip + 12, src, 4);
        memcpy(f + ip + 16, dst, 4);
        put16(f + ip + 10, fold(sum16(0, f + ip, 20)));
        l4 = ip + 20;
    }

    memset(f + l4, 0, l4len);
    put16(f + l4, sport);
    put16(f + l4 + 2, dport);
    if (s->proto == 6) {
        put32(f + l4 + 4, 0x10000000u + i * 0x01000000u); /* sequence number */
        f[l4 + 12] = 5 << 4;                              /* 20 bytes of header */
        f[l4 + 13] = 0x02;                                /* SYN */
        put16(f + l4 + 14, 64240);                        /* window */
    } else {
        put16(f + l4 + 4, (uint16_t)l4len);
        memcpy(f + l4 + 8, udp_payload, sizeof(udp_payload));
    }
    /* The pseudo-header: addresses, protocol, upper-layer length. */
    size_t alen = v6 ? 16 : 4;
    uint32_t sum = sum16(0, src, alen);
    sum = sum16(sum, dst, alen);
    sum += (uint32_t)s->proto + (uint32_t)l4len;
    sum = sum16(sum, f + l4, l4len);
    uint16_t c = fold(sum);
    if (s->proto == 17 && c == 0)
        c = 0xffff;
    put16(f + l4 + (s->proto == 6 ? 16 : 6), c);
    return l4 + l4len;
}

int main(int argc, char **argv)
{
    if (argc != 9)
        return usage("wrong number of arguments");
    const char *ifname = argv[1];
    struct shape s;
    if (parse_shape(argv[2], &s))
        return usage("bad SHAPE");
    uint8_t src[16], dst[16];
    int v6;
    if (inet_pton(AF_INET, argv[3], src) == 1 && inet_pton(AF_INET, argv[4], dst) == 1)
        v6 = 0;
    else if (inet_pton(AF_INET6, argv[3], src) == 1 && inet_pton(AF_INET6, argv[4], dst) == 1)
        v6 = 1;
    else
        return usage("SRC and DST must both be IPv4 or both IPv6 addresses");
    if (!v6 && s.next)
        return usage("IPv6 extension headers in an IPv4 frame");
    uint8_t dmac[6];
    if (parse_mac(argv[5], dmac))
        return usage("bad DSTMAC");
    unsigned long dport, count, sport;
    if (parse_uint(argv[6], 65535, &dport) || parse_uint(argv[7], 10000, &count) ||
        parse_uint(argv[8], 65535, &sport) || sport + count > 65536)
        return usage("bad DPORT, COUNT or SPORT");
    if (strlen(ifname) >= IFNAMSIZ)
        return usage("bad IFACE");

    int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: sends only, receives nothing */
    if (fd < 0) {
        perror("rawsend: socket(AF_PACKET)");
        return 1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strcpy(ifr.ifr_name, ifname);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) {
        perror("rawsend: SIOCGIFHWADDR");
        return 1;
    }
    uint8_t smac[6];
    memcpy(smac, ifr.ifr_hwaddr.sa_data, 6);
    unsigned int ifindex = if_nametoindex(ifname);
    if (!ifindex) {
        perror("rawsend: if_nametoindex");
        return 1;
    }

    uint8_t frame[FRAME_MAX];
    size_t len = 0;
    unsigned long sent = 0;
    for (unsigned long i = 0; i < count; i++) {
        len = build(frame, &s, v6, src, dst, dmac, smac, (uint16_t)(sport + i), (uint16_t)dport, (uint32_t)i);
        struct sockaddr_ll to;
        memset(&to, 0, sizeof(to));
        to.sll_family = AF_PACKET;
        to.sll_ifindex = (int)ifindex;
        to.sll_protocol = htons((uint16_t)(frame[12] << 8 | frame[13])); /* the outermost type */
        to.sll_halen = 6;
        memcpy(to.sll_addr, dmac, 6);
        if (sendto(fd, frame, len, 0, (struct sockaddr *)&to, sizeof(to)) != (ssize_t)len) {
            fprintf(stderr, "rawsend: frame %lu: %s\n", i, strerror(errno));
            break;
        }
        sent++;
        struct timespec gap = {0, 50 * 1000 * 1000};
        nanosleep(&gap, NULL);
    }
    close(fd);
    printf("sent=%lu sport=%lu frame_bytes=%zu\n", sent, sport, len);
    return sent == count ? 0 : 1;
}
