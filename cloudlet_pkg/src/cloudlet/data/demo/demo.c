/*
 * cloudlet-demo: a small stateful TCP service for demos, tests and benchmarks.
 *
 * One thread per connection, line-based text protocol (docs/demo-service.md). Each connection
 * keeps its own state (a counter and a small key/value store), so a client can tell whether a
 * resumed session still talks to the same upstream connection. STREAM pushes numbered,
 * timestamped lines at a fixed rate, so a client sees gaps, losses and duplicates; BLOB pushes
 * bulk bytes for throughput measurements.
 *
 * Built static (gcc -static -O2) and shipped in a FROM scratch image: no libc, shell or registry
 * needed at run time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define VERSION "1"
#define MAX_LINE 1024
#define MAX_KEYS 64
#define MAX_KEY 64
#define MAX_VALUE 256
#define MAX_CONNECTIONS 1024
#define MAX_STREAM_COUNT 100000000L
#define MAX_BLOB_BYTES (1L << 34)

static atomic_long next_conn_id = 1;
static atomic_int live_connections = 0;
static char hostname[64] = "unknown";
static struct timespec started;

struct kv {
    char key[MAX_KEY + 1];
    char value[MAX_VALUE + 1];
};

struct conn {
    int fd;
    long id;
    long counter;
    long commands;
    long bytes_in;
    long bytes_out;
    int nkeys;
    struct kv keys[MAX_KEYS];
    char buf[MAX_LINE + 1];
    size_t len;
};

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int send_all(struct conn *c, const char *data, size_t n) {
    while (n > 0) {
        ssize_t w = send(c->fd, data, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += w;
        n -= (size_t)w;
        c->bytes_out += w;
    }
    return 0;
}

static int reply(struct conn *c, const char *fmt, ...) {
    char out[MAX_LINE + 128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, sizeof out - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    if ((size_t)n > sizeof out - 2)
        n = sizeof out - 2;
    out[n++] = '\n';
    return send_all(c, out, (size_t)n);
}

static struct kv *find_key(struct conn *c, const char *key) {
    for (int i = 0; i < c->nkeys; i++)
        if (strcmp(c->keys[i].key, key) == 0)
            return &c->keys[i];
    return NULL;
}

static int parse_long(const char *s, long *out) {
    char *end;
    if (s == NULL || *s == '\0')
        return -1;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < 0)
        return -1;
    *out = v;
    return 0;
}

static int do_stream(struct conn *c, long interval_us, long count) {
    /* Absolute deadlines: a slow reader delays lines (back-pressure) but never changes seq. */
    int64_t next = now_ns(CLOCK_MONOTONIC);
    for (long seq = 1; seq <= count; seq++) {
        if (reply(c, "MSG %ld %lld", seq, (long long)now_ns(CLOCK_REALTIME)) < 0)
            return -1;
        if (seq == count)
            break;
        next += (int64_t)interval_us * 1000;
        struct timespec ts = {.tv_sec = next / 1000000000LL, .tv_nsec = next % 1000000000LL};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
    }
    return reply(c, "END %ld", count);
}

static int do_blob(struct conn *c, long nbytes) {
    static const char pattern[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    char chunk[65536];
    for (size_t i = 0; i < sizeof chunk; i++)
        chunk[i] = pattern[i % (sizeof pattern - 1)];
    if (reply(c, "DATA %ld", nbytes) < 0)
        return -1;
    while (nbytes > 0) {
        size_t n = nbytes > (long)sizeof chunk ? sizeof chunk : (size_t)nbytes;
        if (send_all(c, chunk, n) < 0)
            return -1;
        nbytes -= (long)n;
    }
    return 0;
}

/* Returns 0 to keep going, 1 to close the connection, -1 on a write error. */
static int handle_line(struct conn *c, char *line) {
    char *save = NULL;
    char *cmd = strtok_r(line, " ", &save);
    c->commands++;
    if (cmd == NULL)
        return reply(c, "ERR empty command");
    if (strcmp(cmd, "PING") == 0)
        return reply(c, "PONG");
    if (strcmp(cmd, "ECHO") == 0)
        return reply(c, "%s", save ? save : "");
    if (strcmp(cmd, "INCR") == 0)
        return reply(c, "COUNT %ld", ++c->counter);
    if (strcmp(cmd, "SET") == 0) {
        char *key = strtok_r(NULL, " ", &save);
        char *value = save;
        if (key == NULL || value == NULL || *value == '\0')
            return reply(c, "ERR usage: SET <key> <value>");
        if (strlen(key) > MAX_KEY || strlen(value) > MAX_VALUE)
            return reply(c, "ERR key or value too long (max %d/%d bytes)", MAX_KEY, MAX_VALUE);
        struct kv *kv = find_key(c, key);
        if (kv == NULL) {
            if (c->nkeys >= MAX_KEYS)
                return reply(c, "ERR too many keys (max %d)", MAX_KEYS);
            kv = &c->keys[c->nkeys++];
            strcpy(kv->key, key);
        }
        strcpy(kv->value, value);
        return reply(c, "OK");
    }
    if (strcmp(cmd, "GET") == 0) {
        char *key = strtok_r(NULL, " ", &save);
        if (key == NULL)
            return reply(c, "ERR usage: GET <key>");
        struct kv *kv = find_key(c, key);
        return kv ? reply(c, "VALUE %s", kv->value) : reply(c, "NOTFOUND");
    }
    if (strcmp(cmd, "STREAM") == 0) {
        long interval_us, count;
        if (parse_long(strtok_r(NULL, " ", &save), &interval_us) < 0 ||
            parse_long(strtok_r(NULL, " ", &save), &count) < 0 || count < 1 || count > MAX_STREAM_COUNT ||
            interval_us > 60000000L)
            return reply(c, "ERR usage: STREAM <interval_us 0..60000000> <count 1..%ld>", MAX_STREAM_COUNT);
        return do_stream(c, interval_us, count);
    }
    if (strcmp(cmd, "BLOB") == 0) {
        long nbytes;
        if (parse_long(strtok_r(NULL, " ", &save), &nbytes) < 0 || nbytes > MAX_BLOB_BYTES)
            return reply(c, "ERR usage: BLOB <bytes 0..%ld>", MAX_BLOB_BYTES);
        return do_blob(c, nbytes);
    }
    if (strcmp(cmd, "STATS") == 0)
        return reply(c, "STATS conn=%ld commands=%ld bytes_in=%ld bytes_out=%ld counter=%ld keys=%d", c->id,
                     c->commands, c->bytes_in, c->bytes_out, c->counter, c->nkeys);
    if (strcmp(cmd, "INFO") == 0) {
        int64_t up = (now_ns(CLOCK_MONOTONIC) -
                      ((int64_t)started.tv_sec * 1000000000LL + started.tv_nsec)) / 1000000;
        return reply(c, "INFO version=%s host=%s pid=%d connections=%d uptime_ms=%lld", VERSION, hostname,
                     (int)getpid(), atomic_load(&live_connections), (long long)up);
    }
    if (strcmp(cmd, "TIME") == 0)
        return reply(c, "TIME %lld", (long long)now_ns(CLOCK_REALTIME));
    if (strcmp(cmd, "QUIT") == 0) {
        reply(c, "BYE");
        return 1;
    }
    return reply(c, "ERR unknown command %.32s", cmd);
}

/* Close without a reset: a peer that still sends gets our last reply before the FIN, not an RST
 * that would discard it. Drains at most 64 KiB for at most one second. */
static void close_gracefully(int fd) {
    char sink[4096];
    struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
    shutdown(fd, SHUT_WR);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (int i = 0; i < 16; i++)
        if (recv(fd, sink, sizeof sink, 0) <= 0)
            break;
    close(fd);
}

static void *serve(void *arg) {
    struct conn *c = arg;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (reply(c, "HELLO cloudlet-demo %s host=%s conn=%ld", VERSION, hostname, c->id) < 0)
        goto out;
    for (;;) {
        ssize_t r = recv(c->fd, c->buf + c->len, MAX_LINE - c->len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        c->bytes_in += r;
        c->len += (size_t)r;
        size_t start = 0;
        int rc = 0;
        for (size_t i = 0; i < c->len && rc == 0; i++) {
            if (c->buf[i] != '\n')
                continue;
            c->buf[i] = '\0';
            if (i > start && c->buf[i - 1] == '\r')
                c->buf[i - 1] = '\0';
            rc = handle_line(c, c->buf + start);
            start = i + 1;
        }
        if (rc != 0)
            break;
        memmove(c->buf, c->buf + start, c->len - start);
        c->len -= start;
        if (c->len >= MAX_LINE) {
            reply(c, "ERR line too long (max %d bytes)", MAX_LINE - 1);
            break;
        }
    }
out:
    close_gracefully(c->fd);
    free(c);
    atomic_fetch_sub(&live_connections, 1);
    return NULL;
}

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    const char *port_s = getenv("PORT");
    long port = 7000;
    if (port_s != NULL && (parse_long(port_s, &port) < 0 || port < 1 || port > 65535)) {
        fprintf(stderr, "cloudlet-demo: bad PORT %s\n", port_s);
        return 2;
    }
    gethostname(hostname, sizeof hostname - 1);
    clock_gettime(CLOCK_MONOTONIC, &started);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGPIPE, SIG_IGN);

    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    int v6 = fd >= 0;
    if (!v6)
        fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("cloudlet-demo: socket");
        return 1;
    }
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int rc;
    if (v6) {
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                                  .sin6_addr = in6addr_any};
        rc = bind(fd, (struct sockaddr *)&a6, sizeof a6);
    } else {
        struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                 .sin_addr.s_addr = htonl(INADDR_ANY)};
        rc = bind(fd, (struct sockaddr *)&a4, sizeof a4);
    }
    if (rc < 0 || listen(fd, 128) < 0) {
        perror("cloudlet-demo: bind/listen");
        return 1;
    }
    fprintf(stderr, "cloudlet-demo %s listening on port %ld\n", VERSION, port);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int cfd = accept(fd, NULL, NULL);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
                if (errno == EMFILE || errno == ENFILE)
                    usleep(10000);
                continue;
            }
            perror("cloudlet-demo: accept");
            return 1;
        }
        if (atomic_load(&live_connections) >= MAX_CONNECTIONS) {
            static const char busy[] = "ERR too many connections\n";
            send(cfd, busy, sizeof busy - 1, MSG_NOSIGNAL);
            close(cfd);
            continue;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL) {
            close(cfd);
            continue;
        }
        c->fd = cfd;
        c->id = atomic_fetch_add(&next_conn_id, 1);
        atomic_fetch_add(&live_connections, 1);
        pthread_t t;
        if (pthread_create(&t, &attr, serve, c) != 0) {
            close(cfd);
            free(c);
            atomic_fetch_sub(&live_connections, 1);
        }
    }
}
