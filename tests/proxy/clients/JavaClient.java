// A Java 17 app calling https:// through the proxy with java.net.http.HttpClient.
// Trust: the PKCS#12 truststore the sidecar exports, via JAVA_TOOL_OPTIONS (as inject sets it).
// Usage: java JavaClient METHOD URL PROXY_HOST PROXY_PORT. Prints status, then body.
import java.net.InetSocketAddress;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class JavaClient {
    public static void main(String[] args) throws Exception {
        String method = args[0];
        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.of(new InetSocketAddress(args[2], Integer.parseInt(args[3]))))
            .connectTimeout(Duration.ofSeconds(30))
            .build();
        HttpRequest.BodyPublisher body = method.equals("POST")
            ? HttpRequest.BodyPublishers.ofString("{\"customer\": \"ACME\", \"lines\": [1, 2, 3]}")
            : HttpRequest.BodyPublishers.noBody();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[1]))
            .method(method, body)
            .header("Content-Type", "application/json")
            .timeout(Duration.ofSeconds(30))
            .build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
        System.out.println(response.body());
    }
}
