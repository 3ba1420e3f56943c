#include "step-runner/expr/expression.h"

#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "step-runner/base/status_macros.h"

namespace step_runner::expr {
namespace {

// ---- Lexer --------------------------------------------------------------------------------

enum class Tok { kEnd, kNumber, kString, kIdent, kPunct };

struct Token {
  Tok kind = Tok::kEnd;
  std::string text;  // identifier, punctuation, or the decoded string
  double number = 0;
  int column = 0;    // 1-based, within the expression
};

// An expression as an error message shows it: whole when short, else its start (a 60 KB
// expression in a message would not even fit in the gRPC status that carries it).
std::string Quoted(absl::string_view inner) {
  constexpr size_t kShown = 100;
  if (inner.size() <= kShown + 20) return absl::StrCat("${{", inner, "}}");
  return absl::StrCat("${{", inner.substr(0, kShown), "... (", inner.size(), " bytes)}}");
}

absl::Status ErrorAt(int column, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("column ", column, ": ", message));
}

// Missing properties and indexes are NOT_FOUND, so that `||` can tell them from real errors.
absl::Status MissingAt(int column, absl::string_view message) {
  return absl::NotFoundError(absl::StrCat("column ", column, ": ", message));
}

std::string DescribeToken(const Token& t) {
  switch (t.kind) {
    case Tok::kEnd: return "the end of the expression";
    case Tok::kNumber: return absl::StrCat("the number ", t.text);
    case Tok::kString: return "a string";
    case Tok::kIdent: return absl::StrCat("\"", t.text, "\"");
    case Tok::kPunct: return absl::StrCat("\"", t.text, "\"");
  }
  return "something unexpected";
}

void AppendUtf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// A number as the language's values hold it: a whole number as an integer, as JSON and GitLab
// (Go) write it ("1", not "1.0", in toJSON, messages and outputs); others as doubles.
Json NumberJson(double d) {
  constexpr double kInt64Bound = 9223372036854775808.0;  // 2^63: a whole double below fits exactly
  if (d == std::floor(d) && std::fabs(d) < kInt64Bound) return Json(static_cast<int64_t>(d));
  return Json(d);
}

absl::StatusOr<std::vector<Token>> Lex(absl::string_view src) {
  std::vector<Token> tokens;
  size_t i = 0;
  while (true) {
    while (i < src.size() && absl::ascii_isspace(static_cast<unsigned char>(src[i]))) ++i;
    Token t;
    t.column = static_cast<int>(i) + 1;
    if (i >= src.size()) {
      tokens.push_back(t);
      return tokens;
    }
    char c = src[i];
    if (absl::ascii_isdigit(static_cast<unsigned char>(c))) {
      size_t start = i;
      while (i < src.size() && (absl::ascii_isdigit(static_cast<unsigned char>(src[i])) || src[i] == '.')) ++i;
      if (i < src.size() && (src[i] == 'e' || src[i] == 'E')) {
        ++i;
        if (i < src.size() && (src[i] == '+' || src[i] == '-')) ++i;
        while (i < src.size() && absl::ascii_isdigit(static_cast<unsigned char>(src[i]))) ++i;
      }
      t.kind = Tok::kNumber;
      t.text = std::string(src.substr(start, i - start));
      if (!absl::SimpleAtod(t.text, &t.number) || !std::isfinite(t.number)) {
        return ErrorAt(t.column, absl::StrCat("\"", t.text, "\" is not a number"));
      }
    } else if (absl::ascii_isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t start = i;
      while (i < src.size() && (absl::ascii_isalnum(static_cast<unsigned char>(src[i])) || src[i] == '_' || src[i] == '-')) ++i;
      t.kind = Tok::kIdent;
      t.text = std::string(src.substr(start, i - start));
    } else if (c == '"' || c == '\'') {
      char quote = c;
      ++i;
      t.kind = Tok::kString;
      bool closed = false;
      while (i < src.size()) {
        char d = src[i++];
        if (d == quote) {
          closed = true;
          break;
        }
        if (d != '\\') {
          t.text += d;
          continue;
        }
        if (i >= src.size()) break;
        char e = src[i++];
        switch (e) {
          case 'n': t.text += '\n'; break;
          case 't': t.text += '\t'; break;
          case 'r': t.text += '\r'; break;
          case '\\': case '"': case '\'': case '/': t.text += e; break;
          case 'u': {
            uint32_t cp = 0;
            if (i + 4 > src.size() || !absl::SimpleHexAtoi(src.substr(i, 4), &cp)) {
              return ErrorAt(static_cast<int>(i) - 1, "\\u needs four hex digits");
            }
            i += 4;
            // Past U+FFFF, as in JSON: a high surrogate, then a low one ("\ud83d\ude00"). One
            // alone is no character, and encoded alone it is not UTF-8 either.
            uint32_t low = 0;
            if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= src.size() && src.substr(i, 2) == "\\u" &&
                absl::SimpleHexAtoi(src.substr(i + 2, 4), &low) && low >= 0xDC00 && low <= 0xDFFF) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
              i += 6;
            } else if (cp >= 0xD800 && cp <= 0xDFFF) {
              return ErrorAt(static_cast<int>(i) - 6, "\\u" + std::string(src.substr(i - 4, 4)) +
                                                          " is half of a surrogate pair; give both halves "
                                                          "(\\ud83d\\ude00)");
            }
            AppendUtf8(cp, t.text);
            break;
          }
          default:
            return ErrorAt(static_cast<int>(i) - 1, absl::StrCat("unknown escape \\", std::string(1, e)));
        }
      }
      if (!closed) return ErrorAt(t.column, "the string is not closed");
    } else {
      static const char* kTwo[] = {"==", "!=", "<=", ">=", "&&", "||"};
      t.kind = Tok::kPunct;
      for (const char* op : kTwo) {
        if (src.substr(i, 2) == op) t.text = op;
      }
      if (t.text.empty()) {
        if (std::string("!<>+-.,()[]{}:").find(c) == std::string::npos) {
          return ErrorAt(t.column, absl::StrCat("unexpected character \"", std::string(1, c), "\""));
        }
        t.text = std::string(1, c);
      }
      i += t.text.size();
    }
    tokens.push_back(std::move(t));
  }
}

// ---- Parser -------------------------------------------------------------------------------

struct Node {
  enum Kind { kLiteral, kIdent, kMember, kIndex, kCall, kNot, kBinary, kArray, kObject } kind;
  int column = 0;
  Json literal;
  std::string name;  // identifier, member, function name, or binary operator
  std::vector<std::unique_ptr<Node>> children;
  std::vector<std::string> keys;  // object literal keys, parallel to children
  int height = 1;                 // levels from here to the deepest leaf
};

using NodePtr = std::unique_ptr<Node>;

NodePtr MakeNode(Node::Kind kind, int column) {
  auto n = std::make_unique<Node>();
  n->kind = kind;
  n->column = column;
  return n;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  absl::StatusOr<NodePtr> ParseAll() {
    SR_ASSIGN_OR_RETURN(NodePtr root, ParseOr());
    if (Peek().kind != Tok::kEnd) {
      return ErrorAt(Peek().column, absl::StrCat("expected an operator or the end, found ", DescribeToken(Peek())));
    }
    return root;
  }

 private:
  const Token& Peek() const { return tokens_[pos_]; }
  bool IsPunct(absl::string_view p) const { return Peek().kind == Tok::kPunct && Peek().text == p; }
  Token Next() { return tokens_[pos_ < tokens_.size() - 1 ? pos_++ : pos_]; }
  absl::Status Expect(absl::string_view p) {
    if (!IsPunct(p)) return ErrorAt(Peek().column, absl::StrCat("expected \"", p, "\", found ", DescribeToken(Peek())));
    Next();
    return absl::OkStatus();
  }

  // Guards the recursion: a hostile `((((...` must end in an error, not a stack overflow.
  struct DepthGuard {
    explicit DepthGuard(int& d) : depth(d) { ++depth; }
    ~DepthGuard() { --depth; }
    int& depth;
  };
  absl::Status CheckDepth() {
    if (depth_ > kMaxNesting) return ErrorAt(Peek().column, absl::StrCat("nesting deeper than ", kMaxNesting));
    return absl::OkStatus();
  }
  // Hangs `child` under `parent`. A chain of operators, members or indexes ("1-1-1-...",
  // "a.b.c...") adds a level per link without any bracket, which the nesting check does not
  // see; evaluating a tree (and destroying it) recurses once per level, so its height is
  // bounded too (a 3 KB chain overflowed the stack under the fuzzer).
  absl::Status Adopt(Node& parent, NodePtr child) {
    parent.height = std::max(parent.height, child->height + 1);
    parent.children.push_back(std::move(child));
    if (parent.height > kMaxTreeHeight) {
      return ErrorAt(parent.column, absl::StrCat("the expression is more than ", kMaxTreeHeight,
                                                 " levels deep (each operator, member or index in a chain is a level)"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<NodePtr> ParseBinaryLevel(int level) {
    static const std::vector<std::vector<std::string>> kLevels = {
        {"||"}, {"&&"}, {"==", "!="}, {"<", "<=", ">", ">="}, {"+", "-"}};
    if (level == static_cast<int>(kLevels.size())) return ParseUnary();
    SR_ASSIGN_OR_RETURN(NodePtr left, ParseBinaryLevel(level + 1));
    for (;;) {
      const Token& t = Peek();
      if (t.kind != Tok::kPunct) break;
      const auto& ops = kLevels[level];
      if (std::find(ops.begin(), ops.end(), t.text) == ops.end()) break;
      Token op = Next();
      SR_ASSIGN_OR_RETURN(NodePtr right, ParseBinaryLevel(level + 1));
      NodePtr n = MakeNode(Node::kBinary, op.column);
      n->name = op.text;
      SR_RETURN_IF_ERROR(Adopt(*n, std::move(left)));
      SR_RETURN_IF_ERROR(Adopt(*n, std::move(right)));
      left = std::move(n);
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParseOr() {
    DepthGuard guard(depth_);
    SR_RETURN_IF_ERROR(CheckDepth());
    return ParseBinaryLevel(0);
  }

  absl::StatusOr<NodePtr> ParseUnary() {
    if (IsPunct("!")) {
      DepthGuard guard(depth_);
      SR_RETURN_IF_ERROR(CheckDepth());
      Token t = Next();
      SR_ASSIGN_OR_RETURN(NodePtr operand, ParseUnary());
      NodePtr n = MakeNode(Node::kNot, t.column);
      SR_RETURN_IF_ERROR(Adopt(*n, std::move(operand)));
      return n;
    }
    if (IsPunct("-") && tokens_[pos_ + 1].kind == Tok::kNumber) {
      Next();
      Token num = Next();
      NodePtr n = MakeNode(Node::kLiteral, num.column - 1);
      n->literal = NumberJson(-num.number);
      return ParsePostfix(std::move(n));
    }
    SR_ASSIGN_OR_RETURN(NodePtr primary, ParsePrimary());
    return ParsePostfix(std::move(primary));
  }

  absl::StatusOr<NodePtr> ParsePostfix(NodePtr base) {
    for (;;) {
      if (IsPunct(".")) {
        Token dot = Next();
        if (Peek().kind != Tok::kIdent) {
          return ErrorAt(Peek().column, absl::StrCat("expected a property name after \".\", found ", DescribeToken(Peek())));
        }
        NodePtr n = MakeNode(Node::kMember, Peek().column);
        n->name = Next().text;
        SR_RETURN_IF_ERROR(Adopt(*n, std::move(base)));
        base = std::move(n);
      } else if (IsPunct("[")) {
        Token open = Next();
        SR_ASSIGN_OR_RETURN(NodePtr index, ParseOr());
        SR_RETURN_IF_ERROR(Expect("]"));
        NodePtr n = MakeNode(Node::kIndex, open.column);
        SR_RETURN_IF_ERROR(Adopt(*n, std::move(base)));
        SR_RETURN_IF_ERROR(Adopt(*n, std::move(index)));
        base = std::move(n);
      } else {
        return base;
      }
    }
  }

  absl::StatusOr<NodePtr> ParsePrimary() {
    const Token t = Peek();
    switch (t.kind) {
      case Tok::kNumber: {
        Next();
        NodePtr n = MakeNode(Node::kLiteral, t.column);
        n->literal = NumberJson(t.number);
        return n;
      }
      case Tok::kString: {
        Next();
        NodePtr n = MakeNode(Node::kLiteral, t.column);
        n->literal = t.text;
        return n;
      }
      case Tok::kIdent: {
        Next();
        if (t.text == "true" || t.text == "false" || t.text == "null") {
          NodePtr n = MakeNode(Node::kLiteral, t.column);
          n->literal = t.text == "null" ? Json(nullptr) : Json(t.text == "true");
          return n;
        }
        if (IsPunct("(")) {
          Next();
          NodePtr n = MakeNode(Node::kCall, t.column);
          n->name = t.text;
          if (!IsPunct(")")) {
            for (;;) {
              SR_ASSIGN_OR_RETURN(NodePtr arg, ParseOr());
              SR_RETURN_IF_ERROR(Adopt(*n, std::move(arg)));
              if (!IsPunct(",")) break;
              Next();
            }
          }
          SR_RETURN_IF_ERROR(Expect(")"));
          return n;
        }
        NodePtr n = MakeNode(Node::kIdent, t.column);
        n->name = t.text;
        return n;
      }
      case Tok::kPunct:
        if (t.text == "(") {
          Next();
          SR_ASSIGN_OR_RETURN(NodePtr inner, ParseOr());
          SR_RETURN_IF_ERROR(Expect(")"));
          return inner;
        }
        if (t.text == "[") {
          Next();
          NodePtr n = MakeNode(Node::kArray, t.column);
          DepthGuard guard(depth_);
          SR_RETURN_IF_ERROR(CheckDepth());
          while (!IsPunct("]")) {
            SR_ASSIGN_OR_RETURN(NodePtr item, ParseOr());
            SR_RETURN_IF_ERROR(Adopt(*n, std::move(item)));
            if (!IsPunct(",")) break;
            Next();
          }
          SR_RETURN_IF_ERROR(Expect("]"));
          return n;
        }
        if (t.text == "{") {
          Next();
          NodePtr n = MakeNode(Node::kObject, t.column);
          DepthGuard guard(depth_);
          SR_RETURN_IF_ERROR(CheckDepth());
          while (!IsPunct("}")) {
            if (Peek().kind != Tok::kIdent && Peek().kind != Tok::kString) {
              return ErrorAt(Peek().column, absl::StrCat("expected an object key, found ", DescribeToken(Peek())));
            }
            n->keys.push_back(Next().text);
            SR_RETURN_IF_ERROR(Expect(":"));
            SR_ASSIGN_OR_RETURN(NodePtr item, ParseOr());
            SR_RETURN_IF_ERROR(Adopt(*n, std::move(item)));
            if (!IsPunct(",")) break;
            Next();
          }
          SR_RETURN_IF_ERROR(Expect("}"));
          return n;
        }
        break;
      case Tok::kEnd:
        break;
    }
    return ErrorAt(t.column, absl::StrCat("expected a value, found ", DescribeToken(t)));
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int depth_ = 0;
};

// ---- Evaluator ----------------------------------------------------------------------------

const char* TypeName(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "null";
    case Json::value_t::boolean: return "boolean";
    case Json::value_t::string: return "string";
    case Json::value_t::array: return "array";
    case Json::value_t::object: return "object";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
    case Json::value_t::number_float: return "number";
    default: return "value";
  }
}

struct Result {
  Json json;
  bool sensitive = false;
  std::optional<std::string> path;  // the context path it was read from, when static
};

class Evaluator {
 public:
  explicit Evaluator(const Context& context) : context_(context) {}

  absl::StatusOr<Result> Eval(const Node& n) {
    switch (n.kind) {
      case Node::kLiteral:
        return Result{n.literal, false, std::nullopt};
      case Node::kIdent: {
        auto it = context_.values().find(n.name);
        if (it == context_.values().end()) {
          std::vector<std::string> names;
          for (const auto& [name, v] : context_.values()) names.push_back(name);
          return ErrorAt(n.column, absl::StrCat("unknown context \"", n.name, "\"; available: ", absl::StrJoin(names, ", ")));
        }
        return Result{it->second, context_.IsSensitive(n.name), n.name};
      }
      case Node::kMember: {
        std::string path;
        if (const Json* v = ResolveChain(n, path)) return Result{*v, context_.IsSensitive(path), std::move(path)};
        return Select(n, n.children[0].get(), Json(n.name));  // the general case, and every error
      }
      case Node::kIndex: {
        SR_ASSIGN_OR_RETURN(Result index, Eval(*n.children[1]));
        SR_ASSIGN_OR_RETURN(Result r, Select(n, n.children[0].get(), index.json));
        r.sensitive = r.sensitive || index.sensitive;
        return r;
      }
      case Node::kNot: {
        SR_ASSIGN_OR_RETURN(Result v, Eval(*n.children[0]));
        return Result{!IsTruthy(v.json), v.sensitive, std::nullopt};
      }
      case Node::kArray: {
        Result r{Json::array(), false, std::nullopt};
        for (const auto& child : n.children) {
          SR_ASSIGN_OR_RETURN(Result item, Eval(*child));
          r.json.push_back(std::move(item.json));
          r.sensitive = r.sensitive || item.sensitive;
        }
        return r;
      }
      case Node::kObject: {
        Result r{Json::object(), false, std::nullopt};
        for (size_t i = 0; i < n.children.size(); ++i) {
          SR_ASSIGN_OR_RETURN(Result item, Eval(*n.children[i]));
          r.json[n.keys[i]] = std::move(item.json);
          r.sensitive = r.sensitive || item.sensitive;
        }
        return r;
      }
      case Node::kBinary:
        return Binary(n);
      case Node::kCall:
        return Call(n);
    }
    return ErrorAt(n.column, "internal error: unknown node");
  }

 private:
  // A chain of plain names (steps.build.outputs.x), read in place: only the value at its end is
  // copied, not every container on the way (the `steps` context grows with each step, and a
  // copy per lookup made a long run: sequence quadratic). nullptr when the chain does not
  // resolve simply; Select then gives the result or the error.
  const Json* ResolveChain(const Node& n, std::string& path) const {
    if (n.kind == Node::kIdent) {
      auto it = context_.values().find(n.name);
      if (it == context_.values().end()) return nullptr;
      path = n.name;
      return &it->second;
    }
    if (n.kind != Node::kMember) return nullptr;
    const Json* base = ResolveChain(*n.children[0], path);
    if (base == nullptr || !base->is_object()) return nullptr;
    auto it = base->find(n.name);
    if (it == base->end()) return nullptr;
    absl::StrAppend(&path, ".", n.name);
    return &*it;
  }

  absl::StatusOr<Result> Select(const Node& n, const Node* base_node, const Json& key) {
    SR_ASSIGN_OR_RETURN(Result base, Eval(*base_node));
    std::optional<std::string> path;
    std::string shown = base.path ? *base.path : "the value";
    if (base.json.is_object()) {
      if (!key.is_string()) {
        return ErrorAt(n.column, absl::StrCat("an object's key must be a string, not a ", TypeName(key)));
      }
      const std::string& k = key.get_ref<const std::string&>();
      auto it = base.json.find(k);
      if (it == base.json.end()) {
        return MissingAt(n.column, absl::StrCat(shown, " has no property \"", k, "\""));
      }
      if (base.path) path = absl::StrCat(*base.path, ".", k);
      bool sensitive = base.sensitive && !base.path;  // a derived container stays tainted
      if (path) sensitive = sensitive || context_.IsSensitive(*path);
      return Result{*it, sensitive, path};
    }
    if (base.json.is_array()) {
      if (!key.is_number()) {
        return ErrorAt(n.column, absl::StrCat("an array's index must be a number, not a ", TypeName(key)));
      }
      double d = key.get<double>();
      if (d < 0 || d != std::floor(d) || d >= static_cast<double>(base.json.size())) {
        return MissingAt(n.column, absl::StrCat("index ", ToDisplayString(key), " is outside ", shown,
                                                " (", base.json.size(), " elements)"));
      }
      if (base.path) path = absl::StrCat(*base.path, ".", static_cast<size_t>(d));
      bool sensitive = base.sensitive && !base.path;
      if (path) sensitive = sensitive || context_.IsSensitive(*path);
      return Result{base.json[static_cast<size_t>(d)], sensitive, path};
    }
    return MissingAt(n.column, absl::StrCat("cannot read \"", ToDisplayString(key), "\" of ", shown, ", which is a ",
                                            TypeName(base.json)));
  }

  absl::StatusOr<Result> Binary(const Node& n) {
    const std::string& op = n.name;
    if (op == "||") {
      absl::StatusOr<Result> left = Eval(*n.children[0]);
      if (!left.ok() && !absl::IsNotFound(left.status())) return left.status();
      if (left.ok() && IsTruthy(left->json)) return left;
      return Eval(*n.children[1]);
    }
    SR_ASSIGN_OR_RETURN(Result left, Eval(*n.children[0]));
    if (op == "&&") {
      if (!IsTruthy(left.json)) return left;
      SR_ASSIGN_OR_RETURN(Result right, Eval(*n.children[1]));
      right.sensitive = right.sensitive || left.sensitive;
      return right;
    }
    SR_ASSIGN_OR_RETURN(Result right, Eval(*n.children[1]));
    Result out{nullptr, left.sensitive || right.sensitive, std::nullopt};
    const Json& a = left.json;
    const Json& b = right.json;
    if (op == "==" || op == "!=") {
      bool equal = (a.is_number() && b.is_number()) ? a.get<double>() == b.get<double>() : a == b;
      out.json = op == "==" ? equal : !equal;
      return out;
    }
    if (op == "<" || op == "<=" || op == ">" || op == ">=") {
      int cmp;
      if (a.is_number() && b.is_number()) {
        double x = a.get<double>(), y = b.get<double>();
        cmp = x < y ? -1 : x > y ? 1 : 0;
      } else if (a.is_string() && b.is_string()) {
        cmp = a.get_ref<const std::string&>().compare(b.get_ref<const std::string&>());
      } else {
        return ErrorAt(n.column, absl::StrCat("cannot compare a ", TypeName(a), " with a ", TypeName(b),
                                              "; both sides must be numbers or both strings"));
      }
      out.json = op == "<" ? cmp < 0 : op == "<=" ? cmp <= 0 : op == ">" ? cmp > 0 : cmp >= 0;
      return out;
    }
    if (op == "+") {
      if (a.is_number() && b.is_number()) {
        out.json = NumberJson(a.get<double>() + b.get<double>());
      } else if (a.is_string() && b.is_string()) {
        out.json = a.get<std::string>() + b.get<std::string>();
      } else if (a.is_array() && b.is_array()) {
        out.json = a;
        for (const Json& item : b) out.json.push_back(item);
      } else {
        return ErrorAt(n.column, absl::StrCat("cannot add a ", TypeName(a), " and a ", TypeName(b),
                                              "; use format() to build strings from other types"));
      }
      return out;
    }
    if (op == "-") {
      if (!a.is_number() || !b.is_number()) {
        return ErrorAt(n.column, absl::StrCat("cannot subtract a ", TypeName(b), " from a ", TypeName(a)));
      }
      out.json = NumberJson(a.get<double>() - b.get<double>());
      return out;
    }
    return ErrorAt(n.column, absl::StrCat("unknown operator ", op));
  }

  absl::Status ArgCount(const Node& n, size_t min, size_t max) {
    if (n.children.size() < min || n.children.size() > max) {
      std::string want = min == max ? absl::StrCat(min) : absl::StrCat(min, " to ", max);
      return ErrorAt(n.column, absl::StrCat(n.name, "() takes ", want, " arguments, got ", n.children.size()));
    }
    return absl::OkStatus();
  }

  absl::Status ArgType(const Node& n, const Result& arg, size_t index, Json::value_t type, const char* name) {
    bool ok = type == Json::value_t::number_float ? arg.json.is_number() : arg.json.type() == type;
    if (!ok) {
      return ErrorAt(n.children[index]->column, absl::StrCat(n.name, "() argument ", index + 1, " must be a ", name,
                                                             ", not a ", TypeName(arg.json)));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Result> Call(const Node& n) {
    static const std::vector<std::string> kFunctions = {"contains", "startsWith", "endsWith", "join",
                                                        "format", "toJSON", "fromJSON"};
    if (std::find(kFunctions.begin(), kFunctions.end(), n.name) == kFunctions.end()) {
      return ErrorAt(n.column, absl::StrCat("unknown function \"", n.name, "\"; available: ", absl::StrJoin(kFunctions, ", ")));
    }
    std::vector<Result> args;
    Result out{nullptr, false, std::nullopt};
    for (const auto& child : n.children) {
      SR_ASSIGN_OR_RETURN(Result arg, Eval(*child));
      out.sensitive = out.sensitive || arg.sensitive;
      args.push_back(std::move(arg));
    }
    if (n.name == "contains") {
      SR_RETURN_IF_ERROR(ArgCount(n, 2, 2));
      if (args[0].json.is_string()) {
        SR_RETURN_IF_ERROR(ArgType(n, args[1], 1, Json::value_t::string, "string"));
        out.json = absl::StrContains(args[0].json.get<std::string>(), args[1].json.get<std::string>());
      } else if (args[0].json.is_array()) {
        bool found = false;
        for (const Json& item : args[0].json) found = found || item == args[1].json;
        out.json = found;
      } else {
        return ErrorAt(n.children[0]->column, absl::StrCat("contains() argument 1 must be a string or an array, not a ",
                                                           TypeName(args[0].json)));
      }
    } else if (n.name == "startsWith" || n.name == "endsWith") {
      SR_RETURN_IF_ERROR(ArgCount(n, 2, 2));
      SR_RETURN_IF_ERROR(ArgType(n, args[0], 0, Json::value_t::string, "string"));
      SR_RETURN_IF_ERROR(ArgType(n, args[1], 1, Json::value_t::string, "string"));
      const std::string s = args[0].json.get<std::string>(), affix = args[1].json.get<std::string>();
      out.json = n.name == "startsWith" ? absl::StartsWith(s, affix) : absl::EndsWith(s, affix);
    } else if (n.name == "join") {
      SR_RETURN_IF_ERROR(ArgCount(n, 1, 2));
      SR_RETURN_IF_ERROR(ArgType(n, args[0], 0, Json::value_t::array, "array"));
      std::string separator = ",";
      if (args.size() == 2) {
        SR_RETURN_IF_ERROR(ArgType(n, args[1], 1, Json::value_t::string, "string"));
        separator = args[1].json.get<std::string>();
      }
      std::vector<std::string> parts;
      for (const Json& item : args[0].json) parts.push_back(ToDisplayString(item));
      out.json = absl::StrJoin(parts, separator);
    } else if (n.name == "format") {
      if (n.children.empty()) return ErrorAt(n.column, "format() needs a template string");
      SR_RETURN_IF_ERROR(ArgType(n, args[0], 0, Json::value_t::string, "string"));
      const std::string tmpl = args[0].json.get<std::string>();
      std::string result;
      for (size_t i = 0; i < tmpl.size(); ++i) {
        if (tmpl.compare(i, 2, "{{") == 0 || tmpl.compare(i, 2, "}}") == 0) {
          result += tmpl[i++];
          continue;
        }
        if (tmpl[i] != '{') {
          result += tmpl[i];
          continue;
        }
        size_t close = tmpl.find('}', i);
        size_t index;
        if (close == std::string::npos || !absl::SimpleAtoi(tmpl.substr(i + 1, close - i - 1), &index)) {
          return ErrorAt(n.children[0]->column, absl::StrCat("format() template has a bad placeholder at offset ", i,
                                                             "; use {0}, {1}, ... and {{ }} for literal braces"));
        }
        if (index + 1 >= args.size()) {
          return ErrorAt(n.children[0]->column, absl::StrCat("format() placeholder {", index, "} has no argument"));
        }
        result += ToDisplayString(args[index + 1].json);
        i = close;
      }
      out.json = result;
    } else if (n.name == "toJSON") {
      SR_RETURN_IF_ERROR(ArgCount(n, 1, 1));
      out.json = args[0].json.dump(-1, ' ', false, Json::error_handler_t::replace);
    } else if (n.name == "fromJSON") {
      SR_RETURN_IF_ERROR(ArgCount(n, 1, 1));
      SR_RETURN_IF_ERROR(ArgType(n, args[0], 0, Json::value_t::string, "string"));
      Json parsed = Json::parse(args[0].json.get<std::string>(), nullptr, /*allow_exceptions=*/false);
      if (parsed.is_discarded()) return ErrorAt(n.children[0]->column, "fromJSON() argument is not valid JSON");
      out.json = std::move(parsed);
    }
    return out;
  }

  const Context& context_;
};


// Collects the context paths under `n`: a chain of members and constant string indexes that
// starts at an identifier.
void CollectPaths(const Node& n, std::vector<ContextPath>& out) {
  const Node* chain = &n;
  std::vector<std::string> reversed;
  while (chain->kind == Node::kMember ||
         (chain->kind == Node::kIndex && chain->children[1]->kind == Node::kLiteral &&
          chain->children[1]->literal.is_string())) {
    reversed.push_back(chain->kind == Node::kMember ? chain->name
                                                    : chain->children[1]->literal.get<std::string>());
    chain = chain->children[0].get();
  }
  if (chain->kind == Node::kIdent) {
    ContextPath path{{chain->name}, chain->column};
    path.parts.insert(path.parts.end(), reversed.rbegin(), reversed.rend());
    out.push_back(std::move(path));
    if (chain == &n) return;
  }
  // Anything else (an index by expression, a call, operators) is walked for its own lookups.
  for (const auto& child : chain->children) CollectPaths(*child, out);
  if (chain != &n) {
    // Non-constant indexes between `chain` and `n` hold lookups of their own.
    for (const Node* m = &n; m != chain; m = m->children[0].get()) {
      if (m->kind == Node::kIndex) CollectPaths(*m->children[1], out);
    }
  }
}

}  // namespace

// Finds the "}}" that closes a template starting at `open` (the index of "${{"), skipping
// string literals so that `${{ "}}" }}` works, and the braces of object literals, so that
// `${{ toJSON({"a": {"b": 1}}) }}` does too. npos if it is not closed.
size_t FindTemplateEnd(absl::string_view text, size_t open) {
  char quote = 0;
  int braces = 0;  // object literals open inside the expression
  for (size_t i = open + 3; i < text.size(); ++i) {
    char c = text[i];
    if (quote) {
      if (c == '\\') ++i;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '{') {
      ++braces;
    } else if (c == '}' && braces > 0) {
      --braces;
    } else if (c == '}' && i + 1 < text.size() && text[i + 1] == '}') {
      return i;
    }
  }
  return absl::string_view::npos;
}

absl::StatusOr<std::vector<ContextPath>> CheckTemplates(absl::string_view text) {
  std::vector<ContextPath> paths;
  size_t pos = 0;
  while (true) {
    size_t open = text.find("${{", pos);
    if (open == absl::string_view::npos) break;
    size_t close = FindTemplateEnd(text, open);
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("the expression at offset ", open, " is not closed (missing \"}}\")"));
    }
    absl::string_view inner = text.substr(open + 3, close - open - 3);
    if (inner.size() > kMaxExpressionBytes) {
      return absl::InvalidArgumentError(absl::StrCat("an expression is longer than ", kMaxExpressionBytes, " bytes"));
    }
    absl::StatusOr<std::vector<Token>> tokens = Lex(inner);
    absl::StatusOr<NodePtr> root = tokens.ok() ? Parser(*std::move(tokens)).ParseAll()
                                               : absl::StatusOr<NodePtr>(tokens.status());
    if (!root.ok()) {
      return absl::Status(root.status().code(), absl::StrCat("in ", Quoted(inner), ": ", root.status().message()));
    }
    CollectPaths(**root, paths);
    pos = close + 2;
  }
  return paths;
}

void Context::Set(const std::string& name, Json value) { values_[name] = std::move(value); }
void Context::MarkSensitive(const std::string& dotted_path) { sensitive_paths_.insert(dotted_path); }

bool Context::IsSensitive(const std::string& path) const {
  for (const std::string& s : sensitive_paths_) {
    // The path is the sensitive value, lies inside it, or contains it.
    if (s == path || absl::StartsWith(path, s + ".") || absl::StartsWith(s, path + ".")) return true;
  }
  return false;
}

bool IsTruthy(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return false;
    case Json::value_t::boolean: return v.get<bool>();
    case Json::value_t::string: return !v.get_ref<const std::string&>().empty();
    case Json::value_t::array:
    case Json::value_t::object: return !v.empty();
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
    case Json::value_t::number_float: return v.get<double>() != 0;
    default: return false;
  }
}

std::string ToDisplayString(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "";
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (d == std::floor(d) && std::fabs(d) < 1e15) return absl::StrCat(static_cast<int64_t>(d));
  }
  return v.dump(-1, ' ', false, Json::error_handler_t::replace);
}

absl::StatusOr<Value> Evaluate(absl::string_view expression, const Context& context) {
  if (expression.size() > kMaxExpressionBytes) {
    return absl::InvalidArgumentError(absl::StrCat("the expression is longer than ", kMaxExpressionBytes, " bytes"));
  }
  SR_ASSIGN_OR_RETURN(std::vector<Token> tokens, Lex(expression));
  Parser parser(std::move(tokens));
  SR_ASSIGN_OR_RETURN(NodePtr root, parser.ParseAll());
  Evaluator evaluator(context);
  SR_ASSIGN_OR_RETURN(Result result, evaluator.Eval(*root));
  return Value{std::move(result.json), result.sensitive};
}

bool HasTemplate(absl::string_view text) { return absl::StrContains(text, "${{"); }

absl::StatusOr<Value> Expand(absl::string_view text, const Context& context) {
  std::string out;
  bool sensitive = false;
  size_t pos = 0;
  while (true) {
    size_t open = text.find("${{", pos);
    if (open == absl::string_view::npos) {
      absl::StrAppend(&out, text.substr(pos));
      break;
    }
    size_t close = FindTemplateEnd(text, open);
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("the expression at offset ", open, " is not closed (missing \"}}\")"));
    }
    absl::string_view inner = text.substr(open + 3, close - open - 3);
    absl::StatusOr<Value> value = Evaluate(inner, context);
    if (!value.ok()) {
      return absl::Status(value.status().code(),
                          absl::StrCat("in ", Quoted(inner), ": ", value.status().message()));
    }
    // Exactly one template and nothing else: the value keeps its type.
    if (open == 0 && close + 2 == text.size()) return value;
    absl::StrAppend(&out, text.substr(pos, open - pos));
    out += ToDisplayString(value->json);
    sensitive = sensitive || value->sensitive;
    pos = close + 2;
  }
  return Value{Json(out), sensitive};
}

}  // namespace step_runner::expr
