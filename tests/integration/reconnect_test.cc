// Placeholder replaced by the reconnect/durability tests.
#include "gtest/gtest.h"
