#include "step-runner/expr/expression.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "step-runner/base/testing.h"

namespace step_runner::expr {
namespace {

using ::testing::HasSubstr;

class ExpressionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    context_.Set("inputs", Json{{"name", "world"}, {"count", 3}, {"flag", true}, {"token", "glpat-abc"},
                                {"list", Json::array({"a", "b"})}, {"empty", ""}});
    context_.Set("steps", Json{{"build", {{"outputs", {{"sha", "abc123"}, {"n", 2}}}}}});
    context_.Set("env", Json{{"HOME", "/home/x"}});
    context_.Set("work_dir", "/work");
    context_.MarkSensitive("inputs.token");
  }
  Json Eval(absl::string_view e) {
    auto v = Evaluate(e, context_);
    EXPECT_TRUE(v.ok()) << e << ": " << v.status();
    return v.ok() ? v->json : Json();
  }
  std::string Error(absl::string_view e) {
    auto v = Evaluate(e, context_);
    EXPECT_FALSE(v.ok()) << e << " should fail, got " << (v.ok() ? v->json.dump() : "");
    return std::string(v.status().message());
  }
  Context context_;
};

TEST_F(ExpressionTest, LiteralsAndLookups) {
  EXPECT_EQ(Eval("inputs.name"), "world");
  EXPECT_EQ(Eval("inputs.count"), 3);
  EXPECT_EQ(Eval("steps.build.outputs.sha"), "abc123");
  EXPECT_EQ(Eval("steps['build'].outputs[\"n\"]"), 2);
  EXPECT_EQ(Eval("inputs.list[1]"), "b");
  EXPECT_EQ(Eval("[1, 'two', {a: null, \"b\": [true]}]"), Json::parse(R"([1,"two",{"a":null,"b":[true]}])"));
  EXPECT_EQ(Eval("-2.5e1"), -25.0);
  EXPECT_EQ(Eval("'it\\'s \\u00e9'"), "it's \xc3\xa9");
  // Past U+FFFF as JSON writes it: a surrogate pair is one character (it was encoded as two
  // invalid three-byte halves, which broke every Status listing of the daemon); half a pair is
  // an error.
  EXPECT_EQ(Eval("'smile \\ud83d\\ude00'"), "smile \xF0\x9F\x98\x80");
  EXPECT_THAT(Error("'\\ud83d'"), HasSubstr("\\ud83d is half of a surrogate pair"));
  EXPECT_THAT(Error("'\\ude00 x'"), HasSubstr("\\ude00 is half of a surrogate pair"));
  EXPECT_EQ(Eval("work_dir"), "/work");
}

TEST_F(ExpressionTest, Operators) {
  EXPECT_EQ(Eval("1 + 2 == 3"), true);
  EXPECT_EQ(Eval("'a' + 'b'"), "ab");
  EXPECT_EQ(Eval("[1] + [2]"), Json::parse("[1,2]"));
  EXPECT_EQ(Eval("inputs.count > 2 && inputs.count <= 3"), true);
  EXPECT_EQ(Eval("'abc' < 'abd'"), true);
  EXPECT_EQ(Eval("!inputs.flag || inputs.name != 'world'"), false);
  EXPECT_EQ(Eval("inputs.empty || 'fallback'"), "fallback");
  EXPECT_EQ(Eval("inputs.missing || 'default'"), "default");
  EXPECT_EQ(Eval("steps.nope.outputs.x || inputs.list[9] || 7"), 7);
  EXPECT_EQ(Eval("inputs.flag && inputs.name"), "world");
  EXPECT_EQ(Eval("(1 + 2) - 1"), 2.0);
  EXPECT_EQ(Eval("1 == 1.0"), true);
}

TEST_F(ExpressionTest, Functions) {
  EXPECT_EQ(Eval("contains(inputs.name, 'orl')"), true);
  EXPECT_EQ(Eval("contains(inputs.list, 'c')"), false);
  EXPECT_EQ(Eval("startsWith(inputs.name, 'wo') && endsWith(inputs.name, 'ld')"), true);
  EXPECT_EQ(Eval("join(inputs.list, '-')"), "a-b");
  EXPECT_EQ(Eval("join([1, 2.5, true, null])"), "1,2.5,true,");
  EXPECT_EQ(Eval("format('{0} has {1} {{items}}', inputs.name, inputs.count)"), "world has 3 {items}");
  EXPECT_EQ(Eval("toJSON(inputs.list)"), "[\"a\",\"b\"]");
  EXPECT_EQ(Eval("fromJSON('{\"a\": [1]}').a[0]"), 1);
}

TEST_F(ExpressionTest, ClearErrors) {
  EXPECT_THAT(Error("inputs.name +"), HasSubstr("column 14: expected a value, found the end of the expression"));
  EXPECT_THAT(Error("secrets.x"), HasSubstr("unknown context \"secrets\"; available: env, inputs, steps, work_dir"));
  EXPECT_THAT(Error("inputs.nope"), HasSubstr("inputs has no property \"nope\""));
  EXPECT_THAT(Error("inputs.name + 1"), HasSubstr("cannot add a string and a number; use format()"));
  EXPECT_THAT(Error("inputs.count < 'x'"), HasSubstr("cannot compare a number with a string"));
  EXPECT_THAT(Error("nosuch(1)"), HasSubstr("unknown function \"nosuch\""));
  EXPECT_THAT(Error("join('x')"), HasSubstr("join() argument 1 must be a array, not a string"));
  EXPECT_THAT(Error("'unclosed"), HasSubstr("the string is not closed"));
  EXPECT_THAT(Error("inputs.name inputs.count"), HasSubstr("expected an operator or the end"));
  EXPECT_THAT(Error("fromJSON('{')"), HasSubstr("not valid JSON"));
  EXPECT_THAT(Error("format('{5}', 1)"), HasSubstr("{5} has no argument"));
  EXPECT_THAT(Error("1 # 2"), HasSubstr("unexpected character \"#\""));
}

TEST_F(ExpressionTest, DeepNestingIsAnErrorNotACrash) {
  std::string deep(10000, '(');
  EXPECT_THAT(Error(deep), HasSubstr("nesting deeper than"));
  std::string bangs(10000, '!');
  EXPECT_THAT(Error(bangs + "true"), HasSubstr("nesting deeper than"));
  std::string arrays(10000, '[');
  EXPECT_THAT(Error(arrays), HasSubstr("nesting deeper than"));
}

// Chains add a level per link without brackets (found by fuzzing: "1-5-1-..." of 3 KB
// overflowed the evaluator's stack). Long enough for any real expression, refused beyond.
TEST_F(ExpressionTest, LongChainsAreAnErrorNotACrash) {
  std::string sum = "1";
  for (int i = 0; i < 200; ++i) sum += " + 1";
  SR_ASSERT_OK_AND_ASSIGN(Value total, Evaluate(sum, context_));
  EXPECT_EQ(total.json, 201);
  std::string minus = "1";
  for (int i = 0; i < 20000; ++i) minus += "-1";
  EXPECT_THAT(Error(minus), HasSubstr("the expression is more than 256 levels deep"));
  // In a template, the error quotes the start of the expression, not all 40 KB of it.
  absl::StatusOr<Value> expanded = Expand("${{ " + minus + " }}", context_);
  ASSERT_FALSE(expanded.ok());
  EXPECT_THAT(std::string(expanded.status().message()), HasSubstr("... (40003 bytes)}}: column"));
  EXPECT_LT(expanded.status().message().size(), 400u);
  std::string members = "inputs";
  for (int i = 0; i < 20000; ++i) members += ".a";
  EXPECT_THAT(Error(members), HasSubstr("more than 256 levels deep"));
  std::string indexes = "inputs.list";
  for (int i = 0; i < 20000; ++i) indexes += "[0]";
  EXPECT_THAT(Error(indexes), HasSubstr("more than 256 levels deep"));
}

TEST_F(ExpressionTest, TemplatesKeepTypeOrJoinIntoStrings) {
  SR_ASSERT_OK_AND_ASSIGN(Value whole, Expand("${{ inputs.count }}", context_));
  EXPECT_EQ(whole.json, 3);
  SR_ASSERT_OK_AND_ASSIGN(Value joined, Expand("n=${{inputs.count}} list=${{ inputs.list }} ${{ null }}end", context_));
  EXPECT_EQ(joined.json, "n=3 list=[\"a\",\"b\"] end");
  SR_ASSERT_OK_AND_ASSIGN(Value braces, Expand("${{ \"}}\" }}", context_));
  EXPECT_EQ(braces.json, "}}");
  // Whole numbers are written as JSON and Go write them ("1000", not "1000.0").
  SR_ASSERT_OK_AND_ASSIGN(Value whole_numbers, Expand("${{ toJSON([1e3, 2 + 3, 0.5, -4, 1e16]) }}", context_));
  EXPECT_EQ(whole_numbers.json, "[1000,5,0.5,-4,10000000000000000]");
  // An object literal's own closing braces do not end the template ("{"b": 1}}" did).
  SR_ASSERT_OK_AND_ASSIGN(Value nested, Expand("${{ toJSON({\"a\": {\"b\": 1}}) }}", context_));
  EXPECT_EQ(nested.json, "{\"a\":{\"b\":1}}");
  SR_ASSERT_OK_AND_ASSIGN(Value tight, Expand("x${{ {\"a\": 1}}}y", context_));
  EXPECT_EQ(tight.json, "x{\"a\":1}y");
  SR_ASSERT_OK_AND_ASSIGN(Value plain, Expand("no templates ${ here }", context_));
  EXPECT_EQ(plain.json, "no templates ${ here }");
  auto unclosed = Expand("echo ${{ inputs.name", context_);
  ASSERT_FALSE(unclosed.ok());
  EXPECT_THAT(std::string(unclosed.status().message()), HasSubstr("at offset 5 is not closed"));
  auto bad = Expand("x ${{ inputs.name + 1 }}", context_);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("in ${{ inputs.name + 1 }}: column 14"));
}

TEST_F(ExpressionTest, SensitivityPropagates) {
  EXPECT_TRUE(Evaluate("inputs.token", context_)->sensitive);
  EXPECT_FALSE(Evaluate("inputs.name", context_)->sensitive);
  EXPECT_TRUE(Evaluate("inputs", context_)->sensitive);  // holds the token
  EXPECT_TRUE(Evaluate("'Bearer ' + inputs.token", context_)->sensitive);
  EXPECT_TRUE(Evaluate("format('{0}', inputs.token)", context_)->sensitive);
  EXPECT_TRUE(Evaluate("toJSON([inputs.token])", context_)->sensitive);
  EXPECT_TRUE(Evaluate("inputs.token == 'x'", context_)->sensitive);
  EXPECT_TRUE(Expand("token=${{ inputs.token }}", context_)->sensitive);
  EXPECT_FALSE(Expand("name=${{ inputs.name }}", context_)->sensitive);
}

TEST_F(ExpressionTest, InvalidUtf8NeverThrows) {
  context_.Set("raw", Json("\xff\xfe"));
  EXPECT_EQ(Eval("toJSON(raw)").get<std::string>().size() > 0, true);
  SR_EXPECT_OK(Expand("${{ raw }} and ${{ [raw] }}", context_).status());
}

}  // namespace
}  // namespace step_runner::expr
