// pattern_writer BYTES [CHUNK] [DELAY_US]: writes BYTES bytes of a deterministic pattern to
// stdout in CHUNK-sized writes, sleeping DELAY_US between writes. The pattern holds newlines,
// carriage returns, NUL and bytes that are not UTF-8, so tests can check byte-exact logs.
// `pattern_writer --expect BYTES` prints the same bytes in one go (what the log must equal).
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace {
char PatternByte(unsigned long long i) {
  static const char kSpecial[] = {'\n', '\r', '\0', '\xff', '\xfe', '\x80', '\n', '\n'};
  unsigned long long h = (i * 2654435761ull) >> 7;
  if (h % 11 == 0) return kSpecial[h % sizeof kSpecial];
  return static_cast<char>('a' + (i % 26));
}
}  // namespace

int main(int argc, char** argv) {
  bool expect = argc > 1 && std::strcmp(argv[1], "--expect") == 0;
  int base = expect ? 2 : 1;
  if (argc <= base) return 2;
  unsigned long long total = std::strtoull(argv[base], nullptr, 10);
  size_t chunk = argc > base + 1 ? std::strtoull(argv[base + 1], nullptr, 10) : 65536;
  unsigned delay = argc > base + 2 ? static_cast<unsigned>(std::strtoul(argv[base + 2], nullptr, 10)) : 0;
  if (expect) {
    chunk = 1 << 20;
    delay = 0;
  }
  std::string buffer;
  for (unsigned long long written = 0; written < total;) {
    size_t n = static_cast<size_t>(std::min<unsigned long long>(chunk, total - written));
    buffer.resize(n);
    for (size_t j = 0; j < n; ++j) buffer[j] = PatternByte(written + j);
    for (size_t off = 0; off < n;) {
      ssize_t w = ::write(1, buffer.data() + off, n - off);
      if (w <= 0) return 1;
      off += static_cast<size_t>(w);
    }
    written += n;
    if (delay) ::usleep(delay);
  }
  return 0;
}
