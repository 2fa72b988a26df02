// SPDX-License-Identifier: MIT
#ifndef PEER_IO_SAFETENSORS_HPP
#define PEER_IO_SAFETENSORS_HPP

/// \file
/// safetensors, the tensor file format the PyTorch ecosystem shares (Hugging Face's), read and written.
///
/// A file is: an 8-byte little-endian unsigned header length L; L bytes of UTF-8 JSON, an object whose
/// keys are tensor names with values {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} plus an
/// optional "__metadata__" object of string values; then the data buffer, every tensor's bytes at
/// [begin, end) of it, little-endian, row-major. The JSON is parsed by nlohmann-json (this header needs
/// it: Debian `nlohmann-json3-dev`; the umbrella header peer/peer.hpp does not include this one).
///
/// Files are untrusted. Before a tensor is read, SafetensorsFile checks, naming the problem: the length
/// fields against the file size (a header of at most 100 MB, as the reference implementation), JSON
/// syntax, duplicate names, every entry's fields and types, known dtypes (F32, F64, BF16, F16, I32, I64),
/// shape products without overflow and equal to the byte range, ranges inside the buffer, and that the
/// ranges cover the buffer exactly, without overlap or hole. Every failure is a std::runtime_error
/// "safetensors <source>: ..."; nothing is read past the file, whatever its bytes.
///
/// open() maps the file instead of reading it (the page cache serves the tensors), and view<T>() hands
/// out a tensor's bytes in place when its dtype is T's and its address is aligned for T; read<T>() and
/// matrix<T>() convert (F32 <-> F64 <-> BF16 <-> F16; integers to integers). The writer pads the header to
/// a multiple of 8 bytes with spaces (as the reference writer does), so tensors of 8-byte types stay
/// aligned in a mapped file, converts on the way out (BF16 and F16 round to nearest even), and saves
/// atomically (a temporary file renamed into place, as our checkpoints).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "peer/core/types.hpp"
#include "peer/io/checkpoint.hpp"

namespace peer {

/// The element types this library reads and writes.
enum class SafetensorsDType { kF32, kF64, kBF16, kF16, kI32, kI64 };

inline const char* to_string(SafetensorsDType d) {
  switch (d) {
    case SafetensorsDType::kF32: return "F32";
    case SafetensorsDType::kF64: return "F64";
    case SafetensorsDType::kBF16: return "BF16";
    case SafetensorsDType::kF16: return "F16";
    case SafetensorsDType::kI32: return "I32";
    case SafetensorsDType::kI64: return "I64";
  }
  return "unknown";
}

/// Bytes per element.
inline std::size_t element_size(SafetensorsDType d) {
  switch (d) {
    case SafetensorsDType::kF32: case SafetensorsDType::kI32: return 4;
    case SafetensorsDType::kF64: case SafetensorsDType::kI64: return 8;
    case SafetensorsDType::kBF16: case SafetensorsDType::kF16: return 2;
  }
  return 0;
}

/// The dtype that stores T exactly (float F32, double F64, int32 I32, int64 I64).
template <typename T>
constexpr SafetensorsDType safetensors_dtype_of() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value || std::is_same<T, std::int32_t>::value ||
                    std::is_same<T, std::int64_t>::value || std::is_same<T, Eigen::bfloat16>::value,
                "peer: safetensors tensors are float, double, bfloat16, int32 or int64 in memory");
  if constexpr (std::is_same<T, Eigen::bfloat16>::value) return SafetensorsDType::kBF16;
  if constexpr (std::is_same<T, float>::value) return SafetensorsDType::kF32;
  if constexpr (std::is_same<T, double>::value) return SafetensorsDType::kF64;
  if constexpr (std::is_same<T, std::int32_t>::value) return SafetensorsDType::kI32;
  return SafetensorsDType::kI64;
}

/// One tensor of a file: name, dtype, shape, and its byte range [begin, end) in the data buffer.
struct SafetensorsTensor {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
  std::int64_t numel = 0;
};

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "peer: safetensors I/O copies little-endian data as is; this host is not little-endian"
#endif

namespace detail {

inline bool is_float_dtype(SafetensorsDType d) {
  return d == SafetensorsDType::kF32 || d == SafetensorsDType::kF64 || d == SafetensorsDType::kBF16 ||
         d == SafetensorsDType::kF16;
}

inline std::uint64_t load_le64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Element i of a stored tensor as T (the caller has checked float-to-float or int-to-int).
template <typename T>
T load_element(const unsigned char* p, SafetensorsDType d, std::size_t i) {
  switch (d) {
    case SafetensorsDType::kF32: { float v; std::memcpy(&v, p + 4 * i, 4); return static_cast<T>(v); }
    case SafetensorsDType::kF64: { double v; std::memcpy(&v, p + 8 * i, 8); return static_cast<T>(v); }
    case SafetensorsDType::kBF16: {
      std::uint16_t b; std::memcpy(&b, p + 2 * i, 2);
      return static_cast<T>(static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(b)));
    }
    case SafetensorsDType::kF16: {
      std::uint16_t b; std::memcpy(&b, p + 2 * i, 2);
      return static_cast<T>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(b)));
    }
    case SafetensorsDType::kI32: { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); return static_cast<T>(v); }
    case SafetensorsDType::kI64: { std::int64_t v; std::memcpy(&v, p + 8 * i, 8); return static_cast<T>(v); }
  }
  return T(0);
}

// Stores v as element i in dtype d (BF16 / F16 round to nearest even via Eigen's conversions).
template <typename T>
void store_element(unsigned char* p, SafetensorsDType d, std::size_t i, T v) {
  switch (d) {
    case SafetensorsDType::kF32: { const float f = static_cast<float>(v); std::memcpy(p + 4 * i, &f, 4); return; }
    case SafetensorsDType::kF64: { const double f = static_cast<double>(v); std::memcpy(p + 8 * i, &f, 8); return; }
    case SafetensorsDType::kBF16: {
      const auto b = Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(static_cast<float>(v)));
      std::memcpy(p + 2 * i, &b, 2);
      return;
    }
    case SafetensorsDType::kF16: {
      const auto b = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(static_cast<float>(v)));
      std::memcpy(p + 2 * i, &b, 2);
      return;
    }
    case SafetensorsDType::kI32: { const auto x = static_cast<std::int32_t>(v); std::memcpy(p + 4 * i, &x, 4); return; }
    case SafetensorsDType::kI64: { const auto x = static_cast<std::int64_t>(v); std::memcpy(p + 8 * i, &x, 8); return; }
  }
}

/// A read-only mapping of a whole file (or nothing for an empty one), unmapped on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("safetensors " + path + ": cannot open: " + errno_text(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw std::runtime_error("safetensors " + path + ": cannot stat: " + errno_text(err));
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw std::runtime_error("safetensors " + path + ": cannot map: " + errno_text(err));
      }
      data_ = static_cast<const unsigned char*>(p);
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const unsigned char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

/// A validated safetensors file (see the file comment), from a path (mapped), from bytes it owns, or
/// from memory the caller keeps alive.
class SafetensorsFile {
 public:
  /// The largest header accepted (the reference implementation's limit).
  static constexpr std::uint64_t kMaxHeaderBytes = 100000000;

  static SafetensorsFile open(const std::string& path) {
    SafetensorsFile f;
    f.where_ = "safetensors " + path + ": ";
    f.mapped_ = std::make_shared<detail::MappedFile>(path);
    f.parse(f.mapped_->data(), f.mapped_->size());
    return f;
  }
  /// Parses a copy of `bytes`.
  static SafetensorsFile from_bytes(std::string bytes) {
    SafetensorsFile f;
    f.where_ = "safetensors (memory): ";
    f.owned_ = std::make_shared<std::string>(std::move(bytes));
    f.parse(reinterpret_cast<const unsigned char*>(f.owned_->data()), f.owned_->size());
    return f;
  }
  /// Parses `size` bytes at `data`, which the caller keeps alive and unchanged while this object is used.
  static SafetensorsFile from_memory(const void* data, std::size_t size) {
    SafetensorsFile f;
    f.where_ = "safetensors (memory): ";
    if (data == nullptr && size > 0) throw std::invalid_argument("SafetensorsFile::from_memory: data is null");
    f.parse(static_cast<const unsigned char*>(data), size);
    return f;
  }

  /// Tensors in the order of their data.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsTensor& tensor(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) throw std::runtime_error(where_ + "no tensor named " + detail::quote_text(name));
    return tensors_[it->second];
  }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// The stored bytes of a tensor (little-endian, row-major; tensor(name).end - begin of them).
  const unsigned char* bytes(const std::string& name) const { return buffer_ + tensor(name).begin; }

  /// The tensor in place when its dtype stores T and its address is aligned for T; otherwise nullptr
  /// (then read() converts or copies).
  template <typename T>
  const T* view(const std::string& name) const {
    const SafetensorsTensor& t = tensor(name);
    const unsigned char* p = buffer_ + t.begin;
    if (t.dtype != safetensors_dtype_of<T>() || reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) return nullptr;
    return reinterpret_cast<const T*>(p);
  }

  /// Element-wise conversion of the whole tensor into out[0, count), count = its number of elements.
  /// Float dtypes convert to float or double, integer dtypes to int32 or int64 (a value that does not fit
  /// is an error); anything else is refused.
  template <typename T>
  void read(const std::string& name, T* out, std::size_t count) const {
    constexpr bool kFloat = std::is_floating_point<T>::value || std::is_same<T, Eigen::bfloat16>::value;
    (void)safetensors_dtype_of<T>();
    const SafetensorsTensor& t = tensor(name);
    if (static_cast<std::int64_t>(count) != t.numel) {
      throw std::invalid_argument(where_ + "read(" + detail::quote_text(name) + "): count " + std::to_string(count) +
                                  " must equal its " + std::to_string(t.numel) + " elements");
    }
    if (kFloat != detail::is_float_dtype(t.dtype)) {
      throw std::runtime_error(where_ + "tensor " + detail::quote_text(name) + " is " + to_string(t.dtype) +
                               ", which does not convert to " + to_string(safetensors_dtype_of<T>()));
    }
    if (count == 0) return;  // an empty tensor (out may then be null: memcpy must not see it)
    if (out == nullptr) throw std::invalid_argument(where_ + "read(" + detail::quote_text(name) + "): out is null");
    const unsigned char* p = buffer_ + t.begin;
    if (t.dtype == safetensors_dtype_of<T>()) {
      std::memcpy(out, p, count * sizeof(T));
      return;
    }
    for (std::size_t i = 0; i < count; ++i) {
      if constexpr (!kFloat) {
        const std::int64_t v = detail::load_element<std::int64_t>(p, t.dtype, i);
        if (v < static_cast<std::int64_t>(std::numeric_limits<T>::min()) || v > static_cast<std::int64_t>(std::numeric_limits<T>::max())) {
          throw std::runtime_error(where_ + "tensor " + detail::quote_text(name) + " element " + std::to_string(i) + " = " +
                                   std::to_string(v) + " does not fit in int32");
        }
        out[i] = static_cast<T>(v);
      } else {
        out[i] = detail::load_element<T>(p, t.dtype, i);
      }
    }
  }

  /// The tensor as a row-major matrix, converted to Scalar: [shape[0], elements / shape[0]] by default
  /// ([1, n] for a 1-D tensor, [1, 1] for a scalar); with rows and cols given, [rows, cols], which must
  /// split the shape in two (rows = the product of its leading dimensions, cols of the rest: a
  /// [H, n, 2, dk] tensor views as [H n 2, dk] or [H n, 2 dk]).
  template <typename Scalar>
  RowMatrix<Scalar> matrix(const std::string& name, Index rows = -1, Index cols = -1) const {
    const auto shape = matrix_shape(name, rows, cols);
    RowMatrix<Scalar> m(shape.first, shape.second);
    read(name, m.data(), static_cast<std::size_t>(m.size()));
    return m;
  }

  /// The [rows, cols] that matrix(name, rows, cols) would return, without reading the tensor; throws
  /// when the shape does not split as asked (see matrix()).
  std::pair<Index, Index> matrix_shape(const std::string& name, Index rows = -1, Index cols = -1) const {
    const SafetensorsTensor& t = tensor(name);
    if (rows < 0 && cols < 0) {
      if (t.shape.size() < 2) return {1, static_cast<Index>(t.numel)};
      const Index r = static_cast<Index>(t.shape[0]);
      return {r, r == 0 ? 0 : static_cast<Index>(t.numel) / r};
    }
    std::int64_t lead = 1;
    for (std::size_t k = 0; k <= t.shape.size(); ++k) {
      if (k > 0) lead *= t.shape[k - 1];
      std::int64_t rest = 1;
      for (std::size_t q = k; q < t.shape.size(); ++q) rest *= t.shape[q];
      if ((rows < 0 || lead == rows) && (cols < 0 || rest == cols)) return {static_cast<Index>(lead), static_cast<Index>(rest)};
    }
    std::string shape;
    for (std::size_t q = 0; q < t.shape.size(); ++q) shape += (q > 0 ? ", " : "") + std::to_string(t.shape[q]);
    throw std::runtime_error(where_ + "tensor " + detail::quote_text(name) + " has shape [" + shape +
                             "], which does not view as a [" + std::to_string(rows) + ", " + std::to_string(cols) + "] matrix");
  }

 private:
  SafetensorsFile() = default;

  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(where_ + what); }

  void parse(const unsigned char* data, std::size_t size) {
    if (size < 8) fail("the file is " + std::to_string(size) + " bytes; it must start with an 8-byte header length");
    const std::uint64_t header = detail::load_le64(data);
    if (header > kMaxHeaderBytes) fail("header length " + std::to_string(header) + " exceeds the limit of 100000000 bytes");
    if (header > size - 8) {
      fail("header length " + std::to_string(header) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
    }
    const char* json_begin = reinterpret_cast<const char*>(data + 8);
    // Duplicate names: the parser keeps the last; the callback sees every key of the top-level object.
    std::set<std::string> seen;
    std::string duplicate;
    nlohmann::json::parser_callback_t check_keys = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      if (event == nlohmann::json::parse_event_t::key && depth == 1 && parsed.is_string()) {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
      }
      return true;
    };
    const nlohmann::json j = nlohmann::json::parse(json_begin, json_begin + header, check_keys, /*allow_exceptions=*/false);
    if (j.is_discarded()) fail("the header is not valid JSON");
    if (!duplicate.empty()) fail("the header names " + detail::quote_text(duplicate) + " twice");
    if (!j.is_object()) fail("the header is JSON but not an object");
    buffer_ = data + 8 + header;
    const std::uint64_t buffer_size = size - 8 - header;
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it->is_object()) fail("\"__metadata__\" must be an object of strings");
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (!m->is_string()) fail("metadata " + detail::quote_text(m.key()) + " is not a string");
          metadata_[m.key()] = m->get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(it.key(), *it, buffer_size));
    }
    // The ranges must tile the buffer: sorted by start, each begins where the previous ended.
    std::sort(tensors_.begin(), tensors_.end(), [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
      return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
    });
    std::uint64_t cursor = 0;
    for (const auto& t : tensors_) {
      if (t.begin < cursor) fail("tensor " + detail::quote_text(t.name) + " overlaps the tensor before it (data_offsets begin " +
                                 std::to_string(t.begin) + " < " + std::to_string(cursor) + ")");
      if (t.begin > cursor) fail("the data buffer has a hole before tensor " + detail::quote_text(t.name) + " (bytes " +
                                 std::to_string(cursor) + " to " + std::to_string(t.begin) + " belong to no tensor)");
      cursor = t.end;
    }
    if (cursor != buffer_size) {
      fail("the data buffer is " + std::to_string(buffer_size) + " bytes but the tensors cover " + std::to_string(cursor));
    }
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  SafetensorsTensor parse_entry(const std::string& name, const nlohmann::json& e, std::uint64_t buffer_size) const {
    const std::string where = "tensor " + detail::quote_text(name);
    if (!e.is_object()) fail(where + " is not an object");
    for (auto it = e.begin(); it != e.end(); ++it) {
      if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets") {
        fail(where + " has an unknown field " + detail::quote_text(it.key()));
      }
    }
    if (!e.contains("dtype") || !e["dtype"].is_string()) fail(where + ": \"dtype\" is missing or not a string");
    if (!e.contains("shape") || !e["shape"].is_array()) fail(where + ": \"shape\" is missing or not an array");
    if (!e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2) {
      fail(where + ": \"data_offsets\" must be an array of two offsets");
    }
    SafetensorsTensor t;
    t.name = name;
    const std::string dtype = e["dtype"].get<std::string>();
    bool known = false;
    for (SafetensorsDType d : {SafetensorsDType::kF32, SafetensorsDType::kF64, SafetensorsDType::kBF16, SafetensorsDType::kF16,
                               SafetensorsDType::kI32, SafetensorsDType::kI64}) {
      if (dtype == to_string(d)) {
        t.dtype = d;
        known = true;
      }
    }
    if (!known) fail(where + " has dtype " + detail::quote_text(dtype) + ", not one of F32, F64, BF16, F16, I32, I64");
    // Elements: a product of non-negative dimensions that must not overflow (checked before multiplying).
    std::uint64_t numel = 1;
    for (const auto& dim : e["shape"]) {
      if (!dim.is_number_unsigned()) fail(where + ": shape entries must be non-negative integers");
      const std::uint64_t v = dim.get<std::uint64_t>();
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) fail(where + ": a shape entry is too large");
      t.shape.push_back(static_cast<std::int64_t>(v));
      if (v != 0 && numel > (std::uint64_t{1} << 62) / v) fail(where + ": the shape's product overflows");
      numel *= v;
    }
    for (const auto& off : e["data_offsets"]) {
      if (!off.is_number_unsigned()) fail(where + ": data_offsets must be non-negative integers");
    }
    t.begin = e["data_offsets"][0].get<std::uint64_t>();
    t.end = e["data_offsets"][1].get<std::uint64_t>();
    if (t.end < t.begin) fail(where + ": data_offsets end " + std::to_string(t.end) + " < begin " + std::to_string(t.begin));
    if (t.end > buffer_size) {
      fail(where + ": data_offsets end " + std::to_string(t.end) + " is past the data buffer (" + std::to_string(buffer_size) + " bytes)");
    }
    if (numel > (std::uint64_t{1} << 62) / element_size(t.dtype) || numel * element_size(t.dtype) != t.end - t.begin) {
      fail(where + ": shape holds " + std::to_string(numel) + " " + to_string(t.dtype) + " elements but data_offsets span " +
           std::to_string(t.end - t.begin) + " bytes");
    }
    t.numel = static_cast<std::int64_t>(numel);
    return t;
  }

  std::string where_;
  std::shared_ptr<detail::MappedFile> mapped_;
  std::shared_ptr<std::string> owned_;
  const unsigned char* buffer_ = nullptr;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file from the caller's arrays (copied at add(), so they may change after).
class SafetensorsWriter {
 public:
  /// Adds tensor `name` of `shape` from data (product of shape elements), stored as `stored` (default:
  /// the dtype of T). Float data may be stored as any float dtype, integers as I32 or I64.
  template <typename T>
  void add(const std::string& name, const T* data, const std::vector<std::int64_t>& shape,
           SafetensorsDType stored = safetensors_dtype_of<T>()) {
    if (name.empty()) throw std::invalid_argument("SafetensorsWriter::add: the tensor name must not be empty");
    if (name == "__metadata__") throw std::invalid_argument("SafetensorsWriter::add: \"__metadata__\" is reserved");
    for (const auto& t : tensors_) {
      if (t.name == name) throw std::invalid_argument("SafetensorsWriter::add: tensor " + detail::quote_text(name) + " is added twice");
    }
    if ((std::is_floating_point<T>::value || std::is_same<T, Eigen::bfloat16>::value) != detail::is_float_dtype(stored)) {
      throw std::invalid_argument(std::string("SafetensorsWriter::add(") + detail::quote_text(name) + "): " +
                                  to_string(safetensors_dtype_of<T>()) + " data cannot be stored as " + to_string(stored));
    }
    std::uint64_t numel = 1;
    for (std::int64_t d : shape) {
      if (d < 0) throw std::invalid_argument("SafetensorsWriter::add(" + detail::quote_text(name) + "): negative dimension");
      numel *= static_cast<std::uint64_t>(d);
    }
    if (data == nullptr && numel > 0) throw std::invalid_argument("SafetensorsWriter::add(" + detail::quote_text(name) + "): data is null");
    Pending p;
    p.name = name;
    p.dtype = stored;
    p.shape = shape;
    p.bytes.resize(static_cast<std::size_t>(numel) * element_size(stored));
    auto* out = reinterpret_cast<unsigned char*>(p.bytes.data());
    for (std::size_t i = 0; i < numel; ++i) detail::store_element(out, stored, i, data[i]);
    tensors_.push_back(std::move(p));
  }

  /// A row-major matrix as a 2-D tensor.
  template <typename Scalar>
  void add_matrix(const std::string& name, const ConstMatrixRef<Scalar>& m, SafetensorsDType stored = safetensors_dtype_of<Scalar>()) {
    if (m.outerStride() != m.cols() && m.rows() > 1) {
      const RowMatrix<Scalar> copy = m;
      add(name, copy.data(), {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())}, stored);
      return;
    }
    add(name, m.data(), {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())}, stored);
  }

  void add_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// The whole file as bytes: header length, JSON header padded with spaces to a multiple of 8, data.
  std::string to_bytes() const {
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      header[t.name] = {{"dtype", to_string(t.dtype)},
                        {"shape", t.shape},
                        {"data_offsets", {offset, offset + t.bytes.size()}}};
      offset += t.bytes.size();
    }
    std::string json = header.dump();
    json.append((8 - json.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    const std::uint64_t n = json.size();
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
    out += json;
    for (const auto& t : tensors_) out += t.bytes;
    return out;
  }

  /// Writes to_bytes() to `path` atomically: a temporary file in the same folder, fsynced, renamed.
  void save(const std::string& path) const {
    const std::string bytes = to_bytes();
    detail::TempFile file(path, "safetensors " + path + ": ");
    file.write(bytes.data(), bytes.size(), 0);
    file.commit();
  }

 private:
  struct Pending {
    std::string name;
    SafetensorsDType dtype;
    std::vector<std::int64_t> shape;
    std::string bytes;
  };
  std::vector<Pending> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace peer

#endif  // PEER_IO_SAFETENSORS_HPP
